// End-to-end training on a small synthetic corpus: determinism, bit-exact resume, checkpoint
// corruption and config mismatch errors.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "cli/checkpoint.h"
#include "cli/trainer.h"
#include "dataloader/token_shard.h"
#include "model/error.h"
#include "model/rng.h"

namespace loopmoe {
namespace {

namespace fs = std::filesystem;

class TrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() /
            ("loopmoe_trainer_" + std::to_string(::getpid()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    fs::create_directories(root_ / "data");
    // A corpus with structure to learn: a repeating pattern with noise.
    Rng rng(5);
    for (const char* split : {"train", "val"}) {
      std::vector<int32_t> tokens(4000);
      for (size_t i = 0; i < tokens.size(); ++i) {
        tokens[i] = rng.uniform() < 0.8 ? static_cast<int32_t>(i % 17)
                                        : static_cast<int32_t>(rng.next_u64() % 60);
      }
      std::vector<uint64_t> docs = {0, 2000, tokens.size()};
      data::write_token_shard(root_ / "data" / (std::string(split) + ".bin"), 60, tokens, docs);
    }
    config_.model.vocab_size = 64;
    config_.model.seq_len = 16;
    config_.model.d_model = 16;
    config_.model.n_heads = 2;
    config_.model.head_dim = 8;
    config_.model.n_layers = 2;
    config_.model.n_loops = 2;
    config_.model.n_experts = 4;
    config_.model.expert_hidden = 16;
    config_.model.iter_adaln = IterAdaLNMode::kJoint;
    config_.model.cond_dim = 4;
    config_.model.capacity_factor = 1.25;
    config_.train.batch_size = 4;
    config_.train.steps = 12;
    config_.train.warmup_steps = 2;
    config_.train.eval_interval = 5;
    config_.train.eval_batches = 2;
    config_.train.checkpoint_interval = 4;
    config_.train.log_interval = 1;
    config_.data.dir = (root_ / "data").string();
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
