#include "dataloader/sampler.h"

#include <string>
#include <utility>

namespace loopmoe::dataloader {
namespace {

// splitmix64 (Steele, Lea, Flood 2014): tiny, well mixed, and trivially reproducible elsewhere.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t state) : state_(state) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n) by rejection, so no value is favoured (n > 0).
  uint64_t below(uint64_t n) {
    const uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    uint64_t r;
    do {
      r = next();
    } while (r >= limit);
    return r % n;
  }

 private:
  uint64_t state_;
};

}  // namespace

std::vector<uint64_t> epoch_permutation(uint64_t n, uint64_t seed, uint64_t epoch) {
  // Mixing the seed first keeps (seed, epoch) and (seed + 1, epoch - 1)-like pairs apart.
  SplitMix64 rng(SplitMix64(seed).next() ^ epoch);
  std::vector<uint64_t> perm(n);
  for (uint64_t i = 0; i < n; ++i) perm[i] = i;
  for (uint64_t i = n; i > 1; --i) {
    const uint64_t j = rng.below(i);
    std::swap(perm[i - 1], perm[j]);
  }
  return perm;
}

std::vector<uint64_t> spread_order(uint64_t n) {
  int bits = 0;
  while ((uint64_t{1} << bits) < n) ++bits;
  std::vector<uint64_t> order;
  order.reserve(n);
  for (uint64_t i = 0; order.size() < n; ++i) {
    uint64_t r = 0;
    for (int b = 0; b < bits; ++b) r |= ((i >> b) & 1) << (bits - 1 - b);
    if (r < n) order.push_back(r);
  }
  return order;
}

BatchSampler::BatchSampler(const TokenShard& shard, int batch, int seq_len, uint64_t seed,
                           WindowOrder order, uint64_t begin, uint64_t end)
    : shard_(&shard),
      batch_(batch),
      seq_len_(seq_len),
      seed_(seed),
      order_kind_(order),
      begin_(begin) {
  if (batch <= 0 || seq_len <= 0) {
    throw DataError(shard.path().string() + ": sampler needs batch > 0 and seq_len > 0 (got " +
                    std::to_string(batch) + ", " + std::to_string(seq_len) + ")");
  }
  if (end == UINT64_MAX) end = shard.num_tokens();
  if (begin > end || end > shard.num_tokens()) {
    throw DataError(shard.path().string() + ": sampler range [" + std::to_string(begin) + ", " +
                    std::to_string(end) + ") is not inside the shard's " +
                    std::to_string(shard.num_tokens()) + " tokens");
  }
  const uint64_t window = static_cast<uint64_t>(seq_len) + 1;
  const bool whole = begin == 0 && end == shard.num_tokens();
  if (end - begin < window) {
    throw DataError(shard.path().string() + ": too few tokens for seq_len " +
                    std::to_string(seq_len) + ": " + (whole ? "shard" : "range") + " holds " +
                    std::to_string(end - begin) + ", one window needs " + std::to_string(window));
  }
  windows_ = (end - begin - 1) / static_cast<uint64_t>(seq_len);
  scratch_.resize(window);
  start_epoch();
}

void BatchSampler::start_epoch() {
  if (order_kind_ == WindowOrder::kShuffled) {
    order_ = epoch_permutation(windows_, seed_, epoch_);
  } else if (order_kind_ == WindowOrder::kSpread && order_.empty()) {
    order_ = spread_order(windows_);  // the same every epoch
  }
}

void BatchSampler::next(int32_t* inputs, int32_t* targets) {
  const uint64_t s = static_cast<uint64_t>(seq_len_);
  for (int b = 0; b < batch_; ++b) {
    const uint64_t w = order_.empty() ? index_ : order_[index_];
    shard_->read(begin_ + w * s, s + 1, scratch_.data());
    int32_t* in = inputs + static_cast<uint64_t>(b) * s;
    int32_t* tg = targets + static_cast<uint64_t>(b) * s;
    for (uint64_t t = 0; t < s; ++t) {
      in[t] = scratch_[t];
      tg[t] = scratch_[t + 1];
    }
    if (++index_ == windows_) {
      index_ = 0;
      ++epoch_;
      start_epoch();
    }
  }
}

void BatchSampler::restore(const SamplerState& state) {
  if (state.index >= windows_) {
    throw DataError(shard_->path().string() + ": sampler state index " +
                    std::to_string(state.index) + " is past this shard's " +
                    std::to_string(windows_) + " windows per epoch (different shard or seq_len?)");
  }
  const bool reshuffle = state.seed != seed_ || state.epoch != epoch_;
  seed_ = state.seed;
  epoch_ = state.epoch;
  index_ = state.index;
  if (reshuffle) start_epoch();
}

}  // namespace loopmoe::dataloader
