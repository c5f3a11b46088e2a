// End-to-end training on a small synthetic corpus: determinism, bit-exact resume, checkpoint
// corruption and config mismatch errors.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "cli/checkpoint.h"
#include "cli/trainer.h"
#include "dataloader/token_shard.h"
#include "model/error.h"
#include "tests/tiny_run.h"

namespace loopmoe {
namespace {

namespace fs = std::filesystem;

class TrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = testing::fresh_test_dir(
        "loopmoe_trainer", ::testing::UnitTest::GetInstance()->current_test_info()->name());
    testing::write_pattern_corpus(root_ / "data");
    config_ = testing::tiny_loopmoe_config(root_ / "data");
  }
  void TearDown() override { fs::remove_all(root_); }

  TrainOptions options(const std::string& name) {
    TrainOptions o;
    o.out_dir = (root_ / name).string();
    o.progress = false;
    return o;
  }
  static std::string read_all(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

  fs::path root_;
  Config config_;
};

TEST_F(TrainerTest, LearnsAndIsDeterministic) {
  config_.train.steps = 60;
  config_.train.lr = 1e-2;
  TrainResult a = train(config_, options("a"));
  TrainResult b = train(config_, options("b"));
  ASSERT_EQ(a.losses.size(), 60u);
  EXPECT_EQ(a.losses, b.losses);  // bit-identical
  // The corpus is 80% a period-17 pattern: the model must get well below uniform (ln 64 = 4.2).
  EXPECT_LT(a.final_val_loss, 2.5);
  EXPECT_EQ(read_all(root_ / "a" / "checkpoint.bin"), read_all(root_ / "b" / "checkpoint.bin"));
}

TEST_F(TrainerTest, ResumeContinuesBitExactly) {
  TrainResult straight = train(config_, options("straight"));
  TrainOptions first = options("split");
  first.stop_after = 6;  // not a checkpoint_interval multiple: stopping checkpoints anyway
  TrainResult part1 = train(config_, first);
  ASSERT_EQ(part1.losses.size(), 6u);
  TrainOptions second = options("split");
  second.resume = true;
  TrainResult part2 = train(config_, second);
  ASSERT_EQ(part2.first_step, 6);
  std::vector<double> joined = part1.losses;
  joined.insert(joined.end(), part2.losses.begin(), part2.losses.end());
  EXPECT_EQ(joined, straight.losses);
  EXPECT_EQ(read_all(root_ / "straight" / "checkpoint.bin"),
            read_all(root_ / "split" / "checkpoint.bin"));
  // The metrics file of the resumed run holds each step once.
  std::ifstream m(root_ / "split" / "metrics.jsonl");
  std::string line;
  int train_lines = 0;
  while (std::getline(m, line)) train_lines += line.find("\"loss\"") != std::string::npos;
  EXPECT_EQ(train_lines, 12);
}

TEST_F(TrainerTest, RefusesToOverwriteOrResumeWithAnotherConfig) {
  TrainOptions o = options("run");
  o.stop_after = 2;
  train(config_, o);
  EXPECT_THROW(train(config_, o), ConfigError);  // checkpoint exists, no --resume
  Config other = config_;
  other.train.lr = 1e-2;
  o.resume = true;
  try {
    train(other, o);
    FAIL();
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("lr = "), std::string::npos) << e.what();
  }
}

TEST_F(TrainerTest, CorruptCheckpointIsRejected) {
  TrainOptions o = options("run");
  o.stop_after = 2;
  train(config_, o);
  const fs::path ckpt = root_ / "run" / "checkpoint.bin";
  std::string bytes = read_all(ckpt);
  bytes[bytes.size() / 2] ^= 0x40;
  std::ofstream(ckpt, std::ios::binary | std::ios::trunc) << bytes;
  o.resume = true;
  try {
    train(config_, o);
    FAIL();
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("checksum mismatch"), std::string::npos) << e.what();
  }
  fs::resize_file(ckpt, 100);
  try {
    train(config_, o);
    FAIL();
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }
}

TEST_F(TrainerTest, MissingDataNamesTheFile) {
  config_.data.dir = (root_ / "nowhere").string();
  try {
    train(config_, options("x"));
    FAIL();
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("nowhere"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace loopmoe
