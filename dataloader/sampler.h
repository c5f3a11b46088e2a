// Deterministic, resumable batches of fixed-length windows over a token shard.
#pragma once

#include <cstdint>
#include <vector>

#include "dataloader/token_shard.h"

namespace loopmoe::dataloader {

// Everything needed to continue a sampler bit-exactly; this is what a checkpoint stores.
struct SamplerState {
  uint64_t seed = 0;
  uint64_t epoch = 0;
  uint64_t index = 0;  // next window within the epoch
};

// Splits the shard into windows_per_epoch() non-overlapping windows of seq_len + 1 tokens (stride
// seq_len, so each token is a target once per epoch) and hands out `batch` windows per next().
// With shuffle, epoch e visits the windows in a permutation drawn from a PRNG seeded by
// (seed, e); without, in order (for validation). Epochs roll over seamlessly, also mid-batch.
// Windows ignore document boundaries: documents are packed, separated by eos.
class BatchSampler {
 public:
  // The shard must outlive the sampler. Throws DataError if it holds fewer than seq_len + 1
  // tokens, or if batch or seq_len is not positive.
  BatchSampler(const TokenShard& shard, int batch, int seq_len, uint64_t seed, bool shuffle);

  // Fills inputs and targets, each [batch * seq_len] row-major; targets are inputs shifted by
  // one token.
  void next(int32_t* inputs, int32_t* targets);

  SamplerState state() const { return {seed_, epoch_, index_}; }
  // Continues from `state` (taken from a sampler over the same shard and shape); throws
  // DataError if its index does not fit this shard.
  void restore(const SamplerState& state);

  uint64_t windows_per_epoch() const { return windows_; }
  int batch() const { return batch_; }
  int seq_len() const { return seq_len_; }

 private:
  void start_epoch();

  const TokenShard* shard_;
  int batch_;
  int seq_len_;
  uint64_t seed_;
  bool shuffle_;
  uint64_t windows_;
  uint64_t epoch_ = 0;
  uint64_t index_ = 0;
  std::vector<uint64_t> order_;  // this epoch's window order (empty when not shuffling)
  std::vector<int32_t> scratch_;
};

// The permutation of [0, n) that epoch `epoch` uses; exposed so tests (and other
// implementations) can check it. Fisher-Yates driven by splitmix64, fully specified in
// docs/DATA.md, so it does not depend on the standard library.
std::vector<uint64_t> epoch_permutation(uint64_t n, uint64_t seed, uint64_t epoch);

}  // namespace loopmoe::dataloader
