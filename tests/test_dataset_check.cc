// Tests for dataloader/dataset_check: vetting a dataset directory from its shard headers.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "dataloader/dataset_check.h"
#include "dataloader/token_shard.h"
#include "tests/dataloader_test_util.h"

namespace loopmoe::dataloader {
namespace {

namespace fs = std::filesystem;
using test_util::expect_error;
using test_util::spit;
using test_util::TempDir;

// ---------------------------------------------------------------------------------------------
// Checking a dataset before a run

void write_counting(const fs::path& path, uint64_t n, uint32_t vocab) {
  std::vector<int32_t> tokens(n);
  for (uint64_t i = 0; i < n; ++i) tokens[i] = static_cast<int32_t>(i % vocab);
  const std::vector<uint64_t> offsets = {0, n};
  write_token_shard(path, vocab, tokens, offsets);
}

TEST(DatasetCheckTest, AcceptsAUsableDataset) {
  TempDir dir;
  write_counting(dir / "train.bin", 1000, 300);
  write_counting(dir / "val.bin", 17, 300);  // exactly one window of seq_len 16
  const DatasetHeaders h = check_dataset(dir.path(), {300, 16, true, ""});
  EXPECT_EQ(h.train.num_tokens, 1000u);
  ASSERT_TRUE(h.val.has_value());
  EXPECT_EQ(h.val->num_tokens, 17u);
  EXPECT_EQ(h.val->vocab_size, 300u);
  check_dataset(dir.path(), {4096, 16, true, ""});  // a larger model vocabulary is fine
}

TEST(DatasetCheckTest, NamesTheFileThatFails) {
  TempDir dir;
  expect_error(
      [&] {
        check_dataset(dir.path(), {300, 16, true, ""});
      },
      dir / "train.bin", "cannot open");
  write_counting(dir / "train.bin", 1000, 300);
  expect_error(
      [&] {
        check_dataset(dir.path(), {300, 16, true, ""});
      },
      dir / "val.bin", "cannot open");
  // A run that never validates does not read val.bin at all.
  EXPECT_FALSE(check_dataset(dir.path(), {300, 16, false, ""}).val.has_value());

  write_token_shard(dir / "val.bin", 300, {}, std::vector<uint64_t>{0});  // the old one-file case
  expect_error(
      [&] {
        check_dataset(dir.path(), {300, 16, true, "it validates at step 5"});
      },
      dir / "val.bin",
      "too few tokens for seq_len 16: shard holds 0, one window needs 17; it validates "
      "at step 5");
  write_counting(dir / "val.bin", 16, 300);
  expect_error(
      [&] {
        check_dataset(dir.path(), {300, 16, true, ""});
      },
      dir / "val.bin", "shard holds 16, one window needs 17");
  expect_error(
      [&] {
        check_dataset(dir.path(), {256, 8, true, ""});
      },
      dir / "train.bin", "shard vocabulary 300 exceeds model.vocab_size 256");
  write_counting(dir / "train.bin", 10, 300);
  expect_error(
      [&] {
        check_dataset(dir.path(), {300, 16, false, ""});
      },
      dir / "train.bin", "too few tokens");
  spit(dir / "train.bin", "not a shard");
  expect_error(
      [&] {
        check_dataset(dir.path(), {300, 16, false, ""});
      },
      dir / "train.bin", "bad magic");
}

}  // namespace
}  // namespace loopmoe::dataloader
