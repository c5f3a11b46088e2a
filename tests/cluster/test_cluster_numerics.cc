// The numerics guard in the distributed runtime: a NaN gradient on one process (worker or shard)
// makes the all-reduced norm NaN, so every process takes the same decision: all skip the step
// (train.nonfinite = "skip"), matching the single-process trainer's skip, or all stop with one
// error ("stop").
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "tests/cluster/cluster_fixture.h"

namespace loopmoe::runtime::testing {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Poisons worker 1's gradients at 0-based step 3 and shard 1's at step 5.
void poison(ProcessSetup& s) {
  const bool worker1 = s.role == Role::kWorker && s.rank == 1;
  const bool shard1 = s.role == Role::kExpertShard && s.rank == 1;
  if (!worker1 && !shard1) return;
  const int64_t at = worker1 ? 3 : 5;
  s.poison_grads_for_test = [at](int64_t step, float* grads, size_t n) {
    if (step == at && n > 0) grads[n / 2] = kNaN;
  };
}

TEST_F(ClusterTest, NonfiniteSkipIsTakenByEveryProcessAndMatchesOneProcess) {
  model::Config c = testing::tiny_loopmoe_config(dir_ / "data");
  c.train.steps = 10;
  c.train.checkpoint_interval = 0;
  c.train.eval_interval = 0;
  c.train.nonfinite = "skip";
  ThreadCluster cluster(c, 2, 2, std::nullopt, poison);
  const std::vector<StepReport> got = cluster.steps(10, c.model.n_loops);
  for (const std::vector<StepReport>& process : cluster.last_reports()) {
    ASSERT_EQ(process.size(), 10u);
    for (size_t s = 0; s < process.size(); ++s) {
      EXPECT_EQ(process[s].skipped, s == 3 || s == 5) << "step " << s + 1;
      EXPECT_EQ(std::isfinite(process[s].grad_norm), s != 3 && s != 5) << "step " << s + 1;
    }
  }
  // The single process skipping the same steps has the same curve (the losses of the skipped
  // steps are finite: only gradients were poisoned).
  train::TrainOptions o;
  o.out_dir = (dir_ / "single").string();
  o.progress = false;
  o.before_finish = [](int64_t step, float* grads) {
    if (step == 3 || step == 5) grads[0] = kNaN;
  };
  const train::TrainResult single = train::run_training(c, o);
  EXPECT_EQ(single.skipped_steps, 2);
  expect_close_curves(single.losses, losses(got), 1e-12);
}

TEST_F(ClusterTest, NonfiniteStopStopsEveryProcessWithOneError) {
  model::Config c = testing::tiny_loopmoe_config(dir_ / "data");
  c.train.steps = 10;
  c.train.checkpoint_interval = 0;
  c.train.eval_interval = 0;
  ThreadCluster cluster(c, 2, 2, std::nullopt, poison);
  try {
    cluster.steps(10, c.model.n_loops);  // every process throws; none waits in a collective
    FAIL() << "the NaN gradient did not stop the job";
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("step 4: the gradient norm or a worker's loss is nan"), std::string::npos)
        << what;
    EXPECT_NE(what.find("train.nonfinite = \"stop\""), std::string::npos) << what;
  }
}

// "rollback": every process throws PolicyRollback naming the failed step (the process server
// sends it to the coordinator, which restarts the job). The replay, here from the start (no
// checkpoint yet; the fault is deterministic and still there), drops that step on every process
// and ends where the single-process trainer's rollback does.
TEST_F(ClusterTest, NonfiniteRollbackNamesTheStepAndTheReplayDropsIt) {
  model::Config c = testing::tiny_loopmoe_config(dir_ / "data");
  c.train.steps = 8;
  c.train.checkpoint_interval = 0;
  c.train.eval_interval = 0;
  c.train.nonfinite = "rollback";
  const auto poison_worker1 = [](ProcessSetup& s) {
    if (s.role != Role::kWorker || s.rank != 1) return;
    s.poison_grads_for_test = [](int64_t step, float* grads, size_t n) {
      if (step == 3 && n > 0) grads[n / 2] = kNaN;
    };
  };
  {
    ThreadCluster cluster(c, 2, 2, std::nullopt, poison_worker1);
    try {
      cluster.steps(8, c.model.n_loops);
      FAIL() << "the NaN gradient did not stop the run";
    } catch (const PolicyRollback& e) {
      EXPECT_EQ(e.step, 3);
      EXPECT_NE(std::string(e.what()).find("train.nonfinite = \"rollback\""), std::string::npos)
          << e.what();
    }
  }
  ThreadCluster replay(c, 2, 2, std::nullopt, poison_worker1);
  const std::vector<StepReport> got = replay.steps(8, c.model.n_loops, {3});
  for (const std::vector<StepReport>& process : replay.last_reports()) {
    ASSERT_EQ(process.size(), 8u);
    for (size_t s = 0; s < process.size(); ++s) {
      EXPECT_EQ(process[s].skipped, s == 3) << "step " << s + 1;
      EXPECT_EQ(process[s].step, static_cast<int64_t>(s) + 1);
    }
  }
  train::TrainOptions o;
  o.out_dir = (dir_ / "single").string();
  o.progress = false;
  o.before_finish = [](int64_t step, float* grads) {
    if (step == 3) grads[0] = kNaN;
  };
  const train::TrainResult single = train::run_training(c, o);
  EXPECT_EQ(single.rollbacks, 1);
  EXPECT_EQ(single.skipped_steps, 1);
  std::vector<double> want = single.losses, have = losses(got);
  ASSERT_EQ(want.size(), 8u);
  ASSERT_EQ(have.size(), 8u);
  EXPECT_TRUE(std::isnan(want[3]) && std::isnan(have[3]));
  want.erase(want.begin() + 3);
  have.erase(have.begin() + 3);
  expect_close_curves(want, have, 1e-12);
}

}  // namespace
}  // namespace loopmoe::runtime::testing
