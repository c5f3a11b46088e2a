// Tests for dataloader/sampler: deterministic, shuffled, resumable batch windows.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "dataloader/sampler.h"
#include "dataloader/token_shard.h"
#include "tests/dataloader_test_util.h"

namespace loopmoe::dataloader {
namespace {

namespace fs = std::filesystem;
using test_util::expect_error;
using test_util::TempDir;

// ---------------------------------------------------------------------------------------------
// Sampler

// A shard whose token i is i % vocab: every window's position is visible in its contents.
fs::path counting_shard(const TempDir& dir, uint64_t n, uint32_t vocab = 65000) {
  std::vector<int32_t> tokens(n);
  for (uint64_t i = 0; i < n; ++i) tokens[i] = static_cast<int32_t>(i % vocab);
  const std::vector<uint64_t> offsets = {0, n};
  const fs::path path = dir / "count.bin";
  write_token_shard(path, vocab, tokens, offsets);
  return path;
}

struct Batch {
  std::vector<int32_t> inputs, targets;
  bool operator==(const Batch&) const = default;
};

std::vector<Batch> draw(BatchSampler& s, int batches) {
  std::vector<Batch> out;
  for (int i = 0; i < batches; ++i) {
    Batch b;
    b.inputs.resize(static_cast<size_t>(s.batch()) * s.seq_len());
    b.targets.resize(b.inputs.size());
    s.next(b.inputs.data(), b.targets.data());
    out.push_back(std::move(b));
  }
  return out;
}

// Window index of each row of each batch (token i == i in counting shards).
std::vector<uint64_t> windows_of(const std::vector<Batch>& batches, int seq_len) {
  std::vector<uint64_t> w;
  for (const Batch& b : batches) {
    for (size_t r = 0; r < b.inputs.size(); r += seq_len) w.push_back(b.inputs[r] / seq_len);
  }
  return w;
}

TEST(SamplerTest, SequentialOrderAndShiftedTargets) {
  TempDir dir;
  const TokenShard shard = TokenShard::open(counting_shard(dir, 41));
  BatchSampler s(shard, 2, 8, 0, /*shuffle=*/false);
  EXPECT_EQ(s.windows_per_epoch(), 5u);  // (41 - 1) / 8
  const std::vector<Batch> b = draw(s, 3);
  for (int t = 0; t < 8; ++t) {
    EXPECT_EQ(b[0].inputs[t], t);
    EXPECT_EQ(b[0].targets[t], t + 1);
    EXPECT_EQ(b[0].inputs[8 + t], 8 + t);
    EXPECT_EQ(b[0].targets[8 + t], 9 + t);
  }
  EXPECT_EQ(b[2].targets[7], 40);  // the last window reaches the very last token
  EXPECT_EQ(windows_of(b, 8), (std::vector<uint64_t>{0, 1, 2, 3, 4, 0}));
  EXPECT_EQ(s.state().epoch, 1u);
  EXPECT_EQ(s.state().index, 1u);
}

TEST(SamplerTest, ShuffledEpochsArePermutationsAndDiffer) {
  TempDir dir;
  const int seq = 4;
  const TokenShard shard = TokenShard::open(counting_shard(dir, 50 * seq + 1));
  BatchSampler s(shard, 5, seq, 42, /*shuffle=*/true);
  ASSERT_EQ(s.windows_per_epoch(), 50u);
  const std::vector<Batch> b = draw(s, 20);  // exactly two epochs
  const std::vector<uint64_t> w = windows_of(b, seq);
  std::vector<uint64_t> e0(w.begin(), w.begin() + 50), e1(w.begin() + 50, w.end());
  EXPECT_EQ(e0, epoch_permutation(50, 42, 0));
  EXPECT_EQ(e1, epoch_permutation(50, 42, 1));
  EXPECT_NE(e0, e1);
  std::sort(e0.begin(), e0.end());
  std::sort(e1.begin(), e1.end());
  for (uint64_t i = 0; i < 50; ++i) {
    EXPECT_EQ(e0[i], i);
    EXPECT_EQ(e1[i], i);
  }
  for (const Batch& batch : b) {
    for (size_t i = 0; i < batch.inputs.size(); ++i) {
      EXPECT_EQ(batch.targets[i], batch.inputs[i] + 1);
    }
  }
  EXPECT_EQ(s.state().epoch, 2u);
  EXPECT_EQ(s.state().index, 0u);
}

TEST(SamplerTest, SameSeedSameBatchesOtherSeedOtherBatches) {
  TempDir dir;
  const TokenShard shard = TokenShard::open(counting_shard(dir, 1000));
  BatchSampler a(shard, 4, 16, 9, true), b(shard, 4, 16, 9, true), c(shard, 4, 16, 10, true);
  const std::vector<Batch> ba = draw(a, 5), bb = draw(b, 5), bc = draw(c, 5);
  EXPECT_EQ(ba, bb);
  EXPECT_NE(ba, bc);
}

TEST(SamplerTest, ResumeIsBitExactAcrossEpochBoundary) {
  TempDir dir;
  const TokenShard shard = TokenShard::open(counting_shard(dir, 10 * 8 + 5));
  for (bool shuffle : {true, false}) {
    BatchSampler straight(shard, 3, 8, 2024, shuffle);
    ASSERT_EQ(straight.windows_per_epoch(), 10u);
    const std::vector<Batch> all = draw(straight, 7);  // 21 windows: crosses two epoch ends

    BatchSampler first(shard, 3, 8, 2024, shuffle);
    std::vector<Batch> resumed = draw(first, 3);
    const SamplerState saved = first.state();
    EXPECT_EQ(saved.epoch, 0u);
    EXPECT_EQ(saved.index, 9u);
    BatchSampler fresh(shard, 3, 8, /*seed=*/1, shuffle);  // the state's seed wins
    fresh.restore(saved);
    const std::vector<Batch> rest = draw(fresh, 4);
    resumed.insert(resumed.end(), rest.begin(), rest.end());
    EXPECT_EQ(all, resumed) << "shuffle=" << shuffle;
    EXPECT_EQ(fresh.state().epoch, straight.state().epoch);
    EXPECT_EQ(fresh.state().index, straight.state().index);
  }
}

TEST(SamplerTest, PermutationIsPinned) {
  // Checkpoints store (seed, epoch, index); changing the permutation would silently change what a
  // resumed run sees, so its values are fixed here.
  EXPECT_EQ(epoch_permutation(10, 1234, 0), (std::vector<uint64_t>{9, 5, 8, 2, 7, 3, 6, 4, 0, 1}));
  EXPECT_EQ(epoch_permutation(1, 5, 3), (std::vector<uint64_t>{0}));
  EXPECT_TRUE(epoch_permutation(0, 5, 3).empty());
}

TEST(SamplerTest, Errors) {
  TempDir dir;
  const fs::path path = counting_shard(dir, 16);
  const TokenShard shard = TokenShard::open(path);
  expect_error([&] { BatchSampler(shard, 1, 16, 0, false); }, path, "too few tokens");
  expect_error([&] { BatchSampler(shard, 0, 4, 0, false); }, path, "batch > 0");
  BatchSampler s(shard, 1, 15, 0, false);  // exactly one window
  EXPECT_EQ(s.windows_per_epoch(), 1u);
  expect_error([&] { s.restore({0, 0, 1}); }, path, "past this shard");
}

}  // namespace
}  // namespace loopmoe::dataloader
