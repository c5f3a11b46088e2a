// The numerics guard of the single-process trainer (train.nonfinite, train.loss_spike_*): a NaN
// gradient injected at one step (TrainOptions::before_finish) is skipped with parameters and AdamW
// state left bit-identical, stops the run with one error, or rolls back to the last checkpoint;
// loss spikes warn or stop. Configs without the guard keep their canonical text.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/error.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "tests/tiny_run.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace loopmoe {
namespace {

namespace fs = std::filesystem;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Parameters, AdamW moments and step count of a checkpoint.
struct State {
  std::vector<float> params, m, v;
  int64_t adam_steps = 0;
  int64_t step = 0;
};

class NumericsGuard : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = testing::fresh_test_dir(
        "loopmoe_numerics", ::testing::UnitTest::GetInstance()->current_test_info()->name());
    testing::write_pattern_corpus(root_ / "data");
    config_ = testing::tiny_loopmoe_config(root_ / "data");
  }
  void TearDown() override { fs::remove_all(root_); }

  train::TrainOptions options(const std::string& name, int stop_after = -1,
                              int64_t poison_step = -1) {
    train::TrainOptions o;
    o.out_dir = (root_ / name).string();
    o.progress = false;
    o.stop_after = stop_after;
    if (poison_step >= 0) {
      o.before_finish = [poison_step](int64_t step, float* grads) {
        if (step == poison_step) grads[0] = kNaN;
      };
    }
    return o;
  }
  State load(const std::string& name, const model::Config& config) {
    model::Config cfg = config;
    cfg.data.dir = fs::absolute(cfg.data.dir).lexically_normal().string();
    model::Model model(cfg.model);
    model::AdamW adam(model.layout(), cfg.train);
    State s;
    s.step =
        train::load_checkpoint((root_ / name / "checkpoint.bin").string(), cfg, model, adam).step;
    s.params.assign(model.params(), model.params() + model.num_params());
    s.m.assign(adam.m().begin(), adam.m().end());
    s.v.assign(adam.v().begin(), adam.v().end());
    s.adam_steps = adam.steps_taken();
    return s;
  }
  static bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  }
  static std::string read_all(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

  fs::path root_;
  model::Config config_;
};

// The default ("stop") ends the run with one error naming the step and the last checkpoint.
TEST_F(NumericsGuard, StopIsTheDefaultAndNamesTheStep) {
  EXPECT_EQ(config_.train.nonfinite, "stop");
  try {
    train::run_training(config_, options("stop", -1, /*poison_step=*/5));
    FAIL() << "a NaN gradient did not stop the run";
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("gradient norm became nan at step 6"), std::string::npos) << what;
    EXPECT_NE(what.find("last checkpoint: "), std::string::npos) << what;
  }
  // The checkpoint before the failure (step 4) is intact.
  EXPECT_EQ(load("stop", config_).step, 4);
}

// "skip": the step leaves parameters and AdamW state bit-identical, and the run goes on.
TEST_F(NumericsGuard, SkipLeavesStateBitIdenticalAndContinues) {
  config_.train.nonfinite = "skip";
  // Checkpoints right before and right after the poisoned step 5 (0-based 4).
  train::run_training(config_, options("before", /*stop_after=*/4, 4));
  train::TrainResult after = train::run_training(config_, options("after", 5, 4));
  EXPECT_EQ(after.skipped_steps, 1);
  const State a = load("before", config_), b = load("after", config_);
  EXPECT_EQ(a.step, 4);
  EXPECT_EQ(b.step, 5);
  EXPECT_TRUE(same_bits(a.params, b.params));
  EXPECT_TRUE(same_bits(a.m, b.m));
  EXPECT_TRUE(same_bits(a.v, b.v));
  EXPECT_EQ(a.adam_steps, b.adam_steps);

  train::TrainResult full = train::run_training(config_, options("full", -1, 4));
  ASSERT_EQ(full.losses.size(), 12u);
  EXPECT_EQ(full.skipped_steps, 1);
  // Only the gradient was poisoned: every loss, the skipped step's too, is finite.
  for (size_t i = 0; i < full.losses.size(); ++i) {
    EXPECT_TRUE(std::isfinite(full.losses[i])) << "step " << i + 1;
  }
  EXPECT_TRUE(std::isfinite(full.final_val_loss));
  const std::string metrics = read_all(root_ / "full" / "metrics.jsonl");
  EXPECT_NE(metrics.find("{\"step\": 5, \"skipped_step\": true"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("\"skipped\": 1}"), std::string::npos) << metrics;
  EXPECT_EQ(metrics.find("nan"), std::string::npos) << metrics;  // the file stays JSON lines
}

// Without the guard firing, a run with it on is the run without it, bit for bit.
TEST_F(NumericsGuard, FiniteRunsAreUnchanged) {
  train::TrainResult plain = train::run_training(config_, options("plain"));
  model::Config guarded = config_;
  guarded.train.nonfinite = "skip";
  guarded.train.loss_spike_factor = 100;
  train::TrainResult with = train::run_training(guarded, options("guarded"));
  EXPECT_EQ(plain.losses, with.losses);
  EXPECT_EQ(with.skipped_steps, 0);
  EXPECT_EQ(with.loss_spikes, 0);
  EXPECT_TRUE(same_bits(load("plain", config_).params, load("guarded", guarded).params));
}

// "rollback": back to the last checkpoint, and the replay drops the failed step's batch: the same
// state as skipping it (the fault here is deterministic).
TEST_F(NumericsGuard, RollbackReplaysFromTheLastCheckpoint) {
  model::Config skip = config_, rollback = config_;
  skip.train.nonfinite = "skip";
  rollback.train.nonfinite = "rollback";
  train::TrainResult skipped = train::run_training(skip, options("skip", -1, 5));
  train::TrainOptions o = options("rollback");
  int poisoned = 0;
  o.before_finish = [&](int64_t step, float* grads) {
    if (step == 5) {
      grads[0] = kNaN;
      ++poisoned;
    }
  };
  train::TrainResult rolled = train::run_training(rollback, o);
  EXPECT_EQ(poisoned, 1);  // the replay dropped step 6's batch without running it
  EXPECT_EQ(rolled.rollbacks, 1);
  EXPECT_EQ(rolled.skipped_steps, 1);
  ASSERT_EQ(rolled.losses.size(), skipped.losses.size());
  for (size_t i = 0; i < rolled.losses.size(); ++i) {
    if (i == 5) continue;
    EXPECT_EQ(rolled.losses[i], skipped.losses[i]) << "step " << i + 1;
  }
  EXPECT_TRUE(same_bits(load("skip", skip).params, load("rollback", rollback).params));
  EXPECT_EQ(rolled.final_val_loss, skipped.final_val_loss);
  // Each step's record is in metrics.jsonl once.
  const std::string metrics = read_all(root_ / "rollback" / "metrics.jsonl");
  EXPECT_EQ(metrics.find("{\"step\": 5, \"loss\""), metrics.rfind("{\"step\": 5, \"loss\""));
}

// A rollback with no checkpoint yet goes back to the run's start.
TEST_F(NumericsGuard, RollbackBeforeAnyCheckpointRestartsTheRun) {
  model::Config skip = config_, rollback = config_;
  skip.train.nonfinite = "skip";
  rollback.train.nonfinite = "rollback";
  train::TrainResult skipped = train::run_training(skip, options("skip", -1, 2));
  train::TrainResult rolled = train::run_training(rollback, options("rollback", -1, 2));
  EXPECT_EQ(rolled.rollbacks, 1);
  EXPECT_TRUE(same_bits(load("skip", skip).params, load("rollback", rollback).params));
}

// A run that keeps failing stops after 10 rollbacks.
TEST_F(NumericsGuard, RollbackGivesUp) {
  config_.train.nonfinite = "rollback";
  train::TrainOptions o = options("always");
  o.before_finish = [](int64_t step, float* grads) {
    if (step >= 1) grads[0] = kNaN;
  };
  try {
    train::run_training(config_, o);
    FAIL() << "the run did not give up";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("after 10 rollbacks"), std::string::npos) << e.what();
  }
}

// A loss spike (here a learning rate far too high) warns, or stops the run with one error.
TEST_F(NumericsGuard, LossSpikeWarnsOrStops) {
  config_.train.lr = 1;  // far too high: the loss jumps within a few steps
  config_.train.nonfinite = "skip";
  config_.train.loss_spike_factor = 1.2;
  config_.train.loss_spike_window = 3;
  train::TrainResult warned = train::run_training(config_, options("warn"));
  std::string curve;
  for (double l : warned.losses) curve += " " + std::to_string(l);
  ASSERT_GT(warned.loss_spikes, 0)
      << "no spike in this run: the test needs another setting:" << curve;
  EXPECT_NE(read_all(root_ / "warn" / "metrics.jsonl").find("\"spikes\": "), std::string::npos);
  config_.train.loss_spike_action = "stop";
  try {
    train::run_training(config_, options("stop"));
    FAIL() << "the spike did not stop the run";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("loss spike at step"), std::string::npos) << e.what();
  }
}

TEST(NumericsGuardConfig, KeysAreCheckedAndLeftOutWhenDefault) {
  model::Config c;
  EXPECT_TRUE(model::numerics_guard_is_default(c.train));
  EXPECT_EQ(model::to_toml(c).find("nonfinite"), std::string::npos);
  c.train.nonfinite = "skip";
  const std::string text = model::to_toml(c);
  EXPECT_NE(text.find("nonfinite = \"skip\""), std::string::npos);
  EXPECT_NE(text.find("loss_spike_window = 50"), std::string::npos);
  EXPECT_EQ(model::parse_config(text, "t").train.nonfinite, "skip");
  for (const char* bad : {"[train]\nnonfinite = \"ignore\"\n", "[train]\nloss_spike_factor = 0.5\n",
                          "[train]\nloss_spike_action = \"rollback\"\n"}) {
    EXPECT_THROW(model::parse_config(bad, "bad.toml"), model::ConfigError) << bad;
  }
}

}  // namespace
}  // namespace loopmoe
