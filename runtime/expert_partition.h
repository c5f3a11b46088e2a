// Which expert shard owns which experts: shard s owns the contiguous global ids [begin(s), end(s)),
// as even as possible. Every unique layer is partitioned the same way.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace loopmoe::runtime {

class ExpertPartition {
 public:
  ExpertPartition(int num_experts, int num_shards) : experts_(num_experts), shards_(num_shards) {
    if (num_shards < 1 || num_shards > num_experts) {
      throw std::invalid_argument("cannot split " + std::to_string(num_experts) + " experts over " +
                                  std::to_string(num_shards) + " shards");
    }
  }
  int num_experts() const { return experts_; }
  int num_shards() const { return shards_; }
  int begin(int shard) const {
    return static_cast<int>(static_cast<int64_t>(shard) * experts_ / shards_);
  }
  int end(int shard) const { return begin(shard + 1); }
  int size(int shard) const { return end(shard) - begin(shard); }
  int owner(int expert) const {
    int s = static_cast<int>(static_cast<int64_t>(expert) * shards_ / experts_);
    while (expert >= end(s)) ++s;
    while (expert < begin(s)) --s;
    return s;
  }

 private:
  int experts_, shards_;
};

}  // namespace loopmoe::runtime
