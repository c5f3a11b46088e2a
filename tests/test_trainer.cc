// End-to-end training on a small synthetic corpus: determinism, bit-exact resume, checkpoint
// corruption and config mismatch errors.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "dataloader/data_error.h"
#include "dataloader/prepare.h"
#include "dataloader/token_shard.h"
#include "model/error.h"
#include "tests/tiny_run.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

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

  train::TrainOptions options(const std::string& name) {
    train::TrainOptions o;
    o.out_dir = (root_ / name).string();
    o.progress = false;
    return o;
  }
  static std::string read_all(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

  fs::path root_;
  model::Config config_;
};

TEST_F(TrainerTest, LearnsAndIsDeterministic) {
  config_.train.steps = 60;
  config_.train.lr = 1e-2;
  train::TrainResult a = train::run_training(config_, options("a"));
  train::TrainResult b = train::run_training(config_, options("b"));
  ASSERT_EQ(a.losses.size(), 60u);
  EXPECT_EQ(a.losses, b.losses);  // bit-identical
  // The corpus is 80% a period-17 pattern: the model must get well below uniform (ln 64 = 4.2).
  EXPECT_LT(a.final_val_loss, 2.5);
  EXPECT_EQ(read_all(root_ / "a" / "checkpoint.bin"), read_all(root_ / "b" / "checkpoint.bin"));
}

TEST_F(TrainerTest, ResumeContinuesBitExactly) {
  train::TrainResult straight = train::run_training(config_, options("straight"));
  train::TrainOptions first = options("split");
  first.stop_after = 6;  // not a checkpoint_interval multiple: stopping checkpoints anyway
  train::TrainResult part1 = train::run_training(config_, first);
  ASSERT_EQ(part1.losses.size(), 6u);
  train::TrainOptions second = options("split");
  second.resume = true;
  train::TrainResult part2 = train::run_training(config_, second);
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
  train::TrainOptions o = options("run");
  o.stop_after = 2;
  train::run_training(config_, o);
  EXPECT_THROW(train::run_training(config_, o),
               model::ConfigError);  // checkpoint exists, no --resume
  model::Config other = config_;
  other.train.lr = 1e-2;
  o.resume = true;
  try {
    train::run_training(other, o);
    FAIL();
  } catch (const model::CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("lr = "), std::string::npos) << e.what();
  }
}

TEST_F(TrainerTest, CorruptCheckpointIsRejected) {
  train::TrainOptions o = options("run");
  o.stop_after = 2;
  train::run_training(config_, o);
  const fs::path ckpt = root_ / "run" / "checkpoint.bin";
  std::string bytes = read_all(ckpt);
  bytes[bytes.size() / 2] ^= 0x40;
  std::ofstream(ckpt, std::ios::binary | std::ios::trunc) << bytes;
  o.resume = true;
  try {
    train::run_training(config_, o);
    FAIL();
  } catch (const model::CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("checksum mismatch"), std::string::npos) << e.what();
  }
  fs::resize_file(ckpt, 100);
  try {
    train::run_training(config_, o);
    FAIL();
  } catch (const model::CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }
}

// Issue 11: a bit flip in the header's step (5 -> 4) used to be accepted; the resumed run redid
// step 5 and overwrote the checkpoint. Now the header checksum refuses it, and nothing is written.
TEST_F(TrainerTest, FlippedCheckpointHeaderIsRejected) {
  train::TrainOptions o = options("run");
  o.stop_after = 5;
  train::run_training(config_, o);
  const fs::path ckpt = root_ / "run" / "checkpoint.bin";
  std::string bytes = read_all(ckpt);
  int64_t step = 0;
  std::memcpy(&step, bytes.data() + 32, 8);  // the header's step field
  ASSERT_EQ(step, 5);
  bytes[32] ^= 0x01;
  std::ofstream(ckpt, std::ios::binary | std::ios::trunc) << bytes;
  const std::string metrics = read_all(root_ / "run" / "metrics.jsonl");
  o.resume = true;
  o.stop_after = -1;
  try {
    train::run_training(config_, o);
    FAIL() << "flipped step accepted";
  } catch (const model::CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find(ckpt.string() + ": header checksum mismatch"),
              std::string::npos)
        << e.what();
  }
  EXPECT_EQ(read_all(ckpt), bytes);
  EXPECT_EQ(read_all(root_ / "run" / "metrics.jsonl"), metrics);
}

TEST_F(TrainerTest, MissingDataNamesTheFile) {
  config_.data.dir = (root_ / "nowhere").string();
  try {
    train::run_training(config_, options("x"));
    FAIL();
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("nowhere"), std::string::npos) << e.what();
  }
}

TEST(FirstValidationStep, FollowsTheTrainerSchedule) {
  model::TrainConfig t;
  t.steps = 100;
  t.eval_interval = 30;
  EXPECT_EQ(train::first_validation_step(t, 0, 100), 30);
  EXPECT_EQ(train::first_validation_step(t, 0, 29), 0);  // --stop-after 29
  EXPECT_EQ(train::first_validation_step(t, 0, 30), 30);
  EXPECT_EQ(train::first_validation_step(t, 30, 59), 0);  // resumed at 30, stops before 60
  EXPECT_EQ(train::first_validation_step(t, 30, 100), 60);
  EXPECT_EQ(train::first_validation_step(t, 90, 100), 100);  // the end of the schedule
  EXPECT_EQ(train::first_validation_step(t, 100, 100), 0);   // nothing left to run
  t.eval_interval = 0;
  EXPECT_EQ(train::first_validation_step(t, 0, 100), 100);  // every full run validates at its end
  EXPECT_EQ(train::first_validation_step(t, 0, 99), 0);
  EXPECT_EQ(train::first_validation_step(t, 40, 100), 100);
}

// Expects run_training() to throw dataloader::DataError naming `file` and saying `what`, having
// written nothing: not even the run directory.
void expect_data_error(const model::Config& c, const train::TrainOptions& o, const fs::path& file,
                       const std::string& what) {
  const auto t0 = std::chrono::steady_clock::now();
  try {
    train::run_training(c, o);
    ADD_FAILURE() << "no error; expected one naming " << file;
  } catch (const dataloader::DataError& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind(file.string(), 0), 0u) << msg;  // the message starts with the file
    EXPECT_NE(msg.find(what), std::string::npos) << msg;
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(1));
  if (!o.resume) {
    EXPECT_FALSE(fs::exists(o.out_dir)) << o.out_dir;
  }
}

TEST_F(TrainerTest, UnusableValidationFailsBeforeTheFirstStep) {
  // The one-file dataset `data prepare` used to write: a validation shard with no tokens. The run
  // would train all its steps and only then fail to validate; now it fails at once.
  const fs::path val = root_ / "data" / "val.bin";
  dataloader::write_token_shard(val, 60, {}, std::vector<uint64_t>{0});
  expect_data_error(config_, options("a"), val,
                    "too few tokens for seq_len 16: shard holds 0, one window needs 17; the run "
                    "validates every train.eval_interval = 5 steps, first after step 5");
  config_.train.eval_interval = 0;
  expect_data_error(config_, options("b"), val,
                    "; the run validates after its last step (train.steps = 12)");

  // A run that validates nowhere does not need val.bin at all, and a resumed run needs it only if
  // its remaining steps validate.
  fs::remove(val);
  train::TrainOptions o = options("c");
  o.stop_after = 11;
  EXPECT_EQ(train::run_training(config_, o).steps_done, 11);
  o.resume = true;
  o.stop_after = -1;  // step 12 is the end of the schedule: it validates
  expect_data_error(config_, o, val, "cannot open");
  EXPECT_FALSE(fs::exists(root_ / "c" / "checkpoint.bin.tmp"));
}

TEST_F(TrainerTest, BadTrainShardOrVocabularyFailsBeforeTheFirstStep) {
  const fs::path train_bin = root_ / "data" / "train.bin";
  config_.model.vocab_size = 40;  // the shards hold ids up to 59
  expect_data_error(config_, options("a"), train_bin,
                    "shard vocabulary 60 exceeds model.vocab_size 40");
  config_.model.vocab_size = 64;
  const std::vector<int32_t> few = {1, 2, 3, 4, 5};
  dataloader::write_token_shard(train_bin, 60, few, std::vector<uint64_t>{0, few.size()});
  expect_data_error(config_, options("b"), train_bin, "too few tokens for seq_len 16");
}

TEST_F(TrainerTest, TrainsOnOneTextFile) {
  // The way most people bring text: one file. `data prepare` cuts it into chunks so both splits
  // get text, and training validates on it.
  std::string text;
  for (int p = 0; p < 60; ++p) {
    for (int s = 0; s < 12; ++s) {
      text += "Paragraph " + std::to_string(p) + " sentence " + std::to_string(s) +
              ": the quick brown fox jumps over the lazy dog near the river bank.\n";
    }
    text += "\n";
  }
  fs::create_directories(root_ / "text");
  std::ofstream(root_ / "text" / "input.txt") << text;
  dataloader::PrepareOptions p;
  p.inputs = {root_ / "text" / "input.txt"};
  p.out_dir = root_ / "book";
  p.vocab_size = 300;
  const dataloader::PrepareResult r = dataloader::prepare_dataset(p);
  ASSERT_EQ(r.chunked_docs, 1u);
  ASSERT_GT(r.val_tokens, 17u);

  config_.data.dir = (root_ / "book").string();
  config_.model.vocab_size = 300;
  config_.train.steps = 6;
  config_.train.eval_interval = 3;
  const train::TrainResult result = train::run_training(config_, options("run"));
  EXPECT_EQ(result.steps_done, 6);
  EXPECT_GT(result.final_val_loss, 0.0);
  EXPECT_LT(result.final_val_loss, 10.0);
}

// Resuming a run whose checkpoint is at train.steps: nothing to do, so nothing is run, read or
// written; the result says so and carries the last recorded validation loss.
TEST_F(TrainerTest, ResumingAFinishedRunWritesNothing) {
  config_.train.steps = 4;
  config_.train.eval_interval = 2;
  const train::TrainResult done = train::run_training(config_, options("run"));
  const auto snapshot = [&] {
    std::map<std::string, std::pair<std::string, fs::file_time_type>> files;
    for (const auto& e : fs::directory_iterator(root_ / "run")) {
      files[e.path().filename().string()] = {read_all(e.path()), e.last_write_time()};
    }
    return files;
  };
  const auto before = snapshot();
  train::TrainOptions again = options("run");
  again.resume = true;
  const train::TrainResult r = train::run_training(config_, again);
  EXPECT_TRUE(r.already_complete);
  EXPECT_EQ(r.first_step, 4);
  EXPECT_EQ(r.steps_done, 0);
  EXPECT_TRUE(r.losses.empty());
  EXPECT_EQ(r.final_val_loss, train::recorded_validation_loss((root_ / "run").string()));
  EXPECT_NEAR(r.final_val_loss, done.final_val_loss, 1e-6);  // metrics.jsonl keeps 8 digits
  EXPECT_EQ(snapshot(), before);
  EXPECT_FALSE(done.already_complete);

  // No validation record: no loss to report, and still nothing written.
  fs::remove(root_ / "run" / "metrics.jsonl");
  const train::TrainResult bare = train::run_training(config_, again);
  EXPECT_TRUE(bare.already_complete);
  EXPECT_TRUE(std::isnan(bare.final_val_loss));
  EXPECT_FALSE(fs::exists(root_ / "run" / "metrics.jsonl"));

  // A different config is still refused, as on any resume.
  config_.train.lr *= 2;
  EXPECT_THROW(train::run_training(config_, again), model::CheckpointError);
}

}  // namespace
}  // namespace loopmoe
