// Deterministic, resumable batches of fixed-length windows over a token shard.
#pragma once

#include <cstdint>
#include <vector>

#include "dataloader/token_shard.h"

namespace loopmoe::dataloader {

// The order an epoch visits the windows in.
enum class WindowOrder {
  kSequential,  // 0, 1, 2, ...
  kShuffled,    // a permutation drawn from (seed, epoch): epoch_permutation
  // Bit-reversed (van der Corput) order, windows >= the count skipped: 0, W/2, W/4, 3W/4, ...
  // Every prefix is spread evenly over the shard, so the first n windows of a validation shard
  // that holds several domains one after another sample all of them (docs/DATA.md).
  kSpread,
};

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
// Windows ignore document boundaries: documents are packed, separated by eos. The windows may be
// restricted to the tokens [begin, end) of the shard (one domain of a validation shard).
class BatchSampler {
 public:
  // The shard must outlive the sampler. Throws DataError if the range holds fewer than
  // seq_len + 1 tokens, if batch or seq_len is not positive, or if the range is not inside the
  // shard (end = UINT64_MAX: the shard's end).
  BatchSampler(const TokenShard& shard, int batch, int seq_len, uint64_t seed, WindowOrder order,
               uint64_t begin = 0, uint64_t end = UINT64_MAX);
  // shuffle ? kShuffled : kSequential, over the whole shard.
  BatchSampler(const TokenShard& shard, int batch, int seq_len, uint64_t seed, bool shuffle)
      : BatchSampler(shard, batch, seq_len, seed,
                     shuffle ? WindowOrder::kShuffled : WindowOrder::kSequential) {}

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
  WindowOrder order_kind_;
  uint64_t begin_;
  uint64_t windows_;
  uint64_t epoch_ = 0;
  uint64_t index_ = 0;
  std::vector<uint64_t> order_;  // this epoch's window order (empty when sequential)
  std::vector<int32_t> scratch_;
};

// The permutation of [0, n) that epoch `epoch` uses; exposed so tests (and other
// implementations) can check it. Fisher-Yates driven by splitmix64, fully specified in
// docs/DATA.md, so it does not depend on the standard library.
std::vector<uint64_t> epoch_permutation(uint64_t n, uint64_t seed, uint64_t epoch);

// The kSpread order of [0, n): i in bit-reversed order over ceil(log2 n) bits, values >= n skipped.
std::vector<uint64_t> spread_order(uint64_t n);

}  // namespace loopmoe::dataloader
