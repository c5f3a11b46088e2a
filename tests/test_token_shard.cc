// Tests for dataloader/token_shard: the shard format, its round trip, and every kind of
// corrupt or truncated shard.
#include <gtest/gtest.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "dataloader/token_shard.h"
#include "tests/dataloader_test_util.h"

namespace loopmoe::dataloader {
namespace {

namespace fs = std::filesystem;
using test_util::expect_error;
using test_util::slurp;
using test_util::spit;
using test_util::TempDir;

// ---------------------------------------------------------------------------------------------
// Token shards

struct ShardData {
  std::vector<int32_t> tokens;
  std::vector<uint64_t> offsets;
};

ShardData sample_data(uint32_t vocab) {
  ShardData d;
  d.offsets = {0};
  const int doc_lengths[] = {5, 1, 17, 9};
  int32_t next = 0;
  for (int len : doc_lengths) {
    for (int i = 0; i < len; ++i) {
      d.tokens.push_back(next);
      next = static_cast<int32_t>((next * 7 + 13) % vocab);
    }
    d.offsets.push_back(d.tokens.size());
  }
  d.tokens.back() = static_cast<int32_t>(vocab - 1);  // the largest id must survive too
  return d;
}

void check_round_trip(uint32_t vocab, uint32_t want_bpt) {
  TempDir dir;
  const fs::path path = dir / "shard.bin";
  const ShardData d = sample_data(vocab);
  write_token_shard(path, vocab, d.tokens, d.offsets);
  EXPECT_FALSE(fs::exists(dir / "shard.bin.tmp"));
  EXPECT_EQ(fs::file_size(path),
            kShardHeaderBytes + 8 * d.offsets.size() + want_bpt * d.tokens.size());

  const TokenShard shard = TokenShard::open(path);
  EXPECT_EQ(shard.vocab_size(), vocab);
  EXPECT_EQ(shard.bytes_per_token(), want_bpt);
  EXPECT_EQ(shard.num_tokens(), d.tokens.size());
  EXPECT_EQ(shard.num_docs(), d.offsets.size() - 1);
  for (uint64_t i = 0; i < shard.num_docs(); ++i) {
    EXPECT_EQ(shard.doc_range(i).begin, d.offsets[i]);
    EXPECT_EQ(shard.doc_range(i).end, d.offsets[i + 1]);
  }
  std::vector<int32_t> all(d.tokens.size());
  shard.read(0, all.size(), all.data());
  EXPECT_EQ(all, d.tokens);
  std::vector<int32_t> part(4);
  shard.read(10, 4, part.data());
  EXPECT_TRUE(std::equal(part.begin(), part.end(), d.tokens.begin() + 10));
  expect_error([&] { shard.read(d.tokens.size() - 2, 3, part.data()); }, path, "past the end");
  expect_error([&] { shard.doc_range(shard.num_docs()); }, path, "out of range");
}

TEST(TokenShardTest, RoundTripUint16) { check_round_trip(4096, 2); }
TEST(TokenShardTest, RoundTripUint16AtLimit) { check_round_trip(65535, 2); }
TEST(TokenShardTest, RoundTripUint32) { check_round_trip(70000, 4); }

TEST(TokenShardTest, EmptyShard) {
  TempDir dir;
  const fs::path path = dir / "empty.bin";
  const std::vector<uint64_t> offsets = {0};
  write_token_shard(path, 300, {}, offsets);
  const TokenShard shard = TokenShard::open(path);
  EXPECT_EQ(shard.num_tokens(), 0u);
  EXPECT_EQ(shard.num_docs(), 0u);
}

TEST(TokenShardTest, MoveKeepsMapping) {
  TempDir dir;
  const fs::path path = dir / "s.bin";
  const ShardData d = sample_data(1000);
  write_token_shard(path, 1000, d.tokens, d.offsets);
  TokenShard a = TokenShard::open(path);
  TokenShard b = std::move(a);
  std::vector<int32_t> all(d.tokens.size());
  b.read(0, all.size(), all.data());
  EXPECT_EQ(all, d.tokens);
}

TEST(TokenShardTest, WriterRejectsBadInputAndLeavesNoFile) {
  TempDir dir;
  const fs::path path = dir / "bad.bin";
  const ShardData d = sample_data(100);
  expect_error([&] { write_token_shard(path, 50, d.tokens, d.offsets); }, path, "outside vocab");
  std::vector<uint64_t> short_offsets = d.offsets;
  short_offsets.back() -= 1;
  expect_error([&] { write_token_shard(path, 100, d.tokens, short_offsets); }, path,
               "doc_offsets ends at");
  std::vector<uint64_t> decreasing = d.offsets;
  decreasing[2] = 0;
  expect_error([&] { write_token_shard(path, 100, d.tokens, decreasing); }, path, "decreases");
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(dir / "bad.bin.tmp"));
}

class CorruptShardTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_ / "shard.bin";
    const ShardData d = sample_data(1000);
    num_tokens_ = d.tokens.size();
    write_token_shard(path_, 1000, d.tokens, d.offsets);
    bytes_ = slurp(path_);
  }
  void patch_u32(size_t at, uint32_t v) { std::memcpy(&bytes_[at], &v, 4); }
  // Recomputes the header checksum after a patch, so that the checks behind it are reached.
  void reseal() {
    const uint64_t sum = XXH64(bytes_.data(), kShardHeaderBytesV1, 0);
    std::memcpy(&bytes_[kShardHeaderBytesV1], &sum, 8);
  }
  void save() { spit(path_, bytes_); }
  // TokenShard::open fails with `what`; so does read_shard_header for the errors its header and
  // sizes show, while it accepts what only the checksum or the tokens give away.
  void expect_open_error(const std::string& what, bool header_shows_it = true) {
    save();
    expect_error([&] { TokenShard::open(path_); }, path_, what);
    if (header_shows_it) {
      expect_error([&] { read_shard_header(path_); }, path_, what);
    } else {
      EXPECT_NO_THROW(read_shard_header(path_)) << what;
    }
  }

  TempDir dir_;
  fs::path path_;
  std::string bytes_;
  size_t num_tokens_ = 0;
};

TEST_F(CorruptShardTest, BadMagic) {
  bytes_[3] = 'X';
  expect_open_error("bad magic");
}

TEST_F(CorruptShardTest, NotAShardAtAll) {
  bytes_ = "hello, world\n";
  expect_open_error("bad magic");
}

TEST_F(CorruptShardTest, CutInsideHeader) {
  bytes_.resize(20);
  expect_open_error("truncated: file holds 20 bytes");
}

TEST_F(CorruptShardTest, EmptyFile) {
  bytes_.clear();
  expect_open_error("bad magic");
}

TEST_F(CorruptShardTest, UnsupportedVersion) {
  patch_u32(8, 3);
  expect_open_error("unsupported version 3 (this build reads versions 1 and 2");
}

TEST_F(CorruptShardTest, FlippedHeaderField) {
  bytes_[12] ^= 0x01;  // vocab 1000 -> 1001: every token still fits; only the checksum can tell
  expect_open_error("header checksum mismatch");
}

TEST_F(CorruptShardTest, TruncatedPayload) {
  bytes_.resize(bytes_.size() - 5);  // loses 2.5 tokens
  expect_open_error("truncated: header says " + std::to_string(num_tokens_) +
                    " tokens, file holds " + std::to_string(num_tokens_ - 3));
}

TEST_F(CorruptShardTest, TruncatedOffsetTable) {
  bytes_.resize(kShardHeaderBytes + 16);
  expect_open_error("truncated");
}

TEST_F(CorruptShardTest, TrailingBytes) {
  bytes_ += "xy";
  expect_open_error("trailing bytes");
}

TEST_F(CorruptShardTest, FlippedTokenByte) {
  bytes_[bytes_.size() - 3] ^= 0x01;
  expect_open_error("checksum mismatch", /*header_shows_it=*/false);
}

TEST_F(CorruptShardTest, FlippedOffsetByte) {
  bytes_[kShardHeaderBytes + 9] ^= 0x40;
  expect_open_error("checksum mismatch", /*header_shows_it=*/false);
}

TEST_F(CorruptShardTest, TokenOutOfRange) {
  // A header whose checksums hold but whose vocabulary is smaller than its ids (a buggy writer;
  // or a version 1 shard, whose header no checksum covers): every id is checked.
  patch_u32(12, 10);
  reseal();
  expect_open_error("out of range for vocab 10", /*header_shows_it=*/false);
}

TEST_F(CorruptShardTest, WidthDisagreesWithVocab) {
  patch_u32(12, 70000);
  reseal();
  expect_open_error("vocab 70000 needs uint32 tokens");
}

TEST(TokenShardTest, MissingFileOrDirectory) {
  TempDir dir;
  expect_error([&] { TokenShard::open(dir / "nope.bin"); }, dir / "nope.bin", "cannot open");
  expect_error([&] { TokenShard::open(dir.path()); }, dir.path(), "not a regular file");
  expect_error([&] { read_shard_header(dir / "nope.bin"); }, dir / "nope.bin", "cannot open");
  expect_error([&] { read_shard_header(dir.path()); }, dir.path(), "not a regular file");
}

TEST(TokenShardTest, HeaderAgreesWithOpen) {
  TempDir dir;
  const fs::path path = dir / "s.bin";
  const ShardData d = sample_data(70000);
  write_token_shard(path, 70000, d.tokens, d.offsets);
  const ShardHeader h = read_shard_header(path);
  const TokenShard shard = TokenShard::open(path);
  EXPECT_EQ(h.vocab_size, shard.vocab_size());
  EXPECT_EQ(h.bytes_per_token, shard.bytes_per_token());
  EXPECT_EQ(h.num_tokens, shard.num_tokens());
  EXPECT_EQ(h.num_docs, shard.num_docs());
  EXPECT_EQ(h.checksum, shard.checksum());
}
}  // namespace
}  // namespace loopmoe::dataloader
