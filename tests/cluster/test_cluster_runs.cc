// Whole runs of the distributed runtime against the single-process engine: W workers + S shards
// (threads, Gloo over loopback) reproduce the single-process trainer's loss curve; resume is
// bit-exact, also onto another shard count; a router that sends everything to one expert does not
// hang anything.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cluster_fixture.h"
#include "model/error.h"
#include "model/model.h"
#include "model/param_layout.h"
#include "runtime/process_checkpoint.h"

namespace loopmoe::runtime {
namespace {

namespace fs = std::filesystem;

using testing::ClusterTest;
using testing::expect_close_curves;
using testing::losses;
using testing::shipped_config;
using testing::single_process_losses;
using testing::ThreadCluster;

// --- Whole runs ----------------------------------------------------------------------------------

// W workers + S shards reproduce `loopmoe train`'s 50-step curve bit for bit: every kernel is
// batch-invariant and every cross-worker sum is either an integer or the same fixed tree
// (docs/MODEL.md). ctest runs these under several OPENBLAS_CORETYPE values
// (tests/cluster/CMakeLists).
void expect_layouts_reproduce_single_process(const model::Config& c, const fs::path& dir) {
  const std::vector<double> want = single_process_losses(c, dir / "single");
  for (const auto& [workers, shards] : {std::pair{2, 2}, std::pair{4, 1}, std::pair{1, 3}}) {
    SCOPED_TRACE(std::to_string(workers) + " workers + " + std::to_string(shards) + " shards");
    ThreadCluster cluster(c, workers, shards);
    expect_close_curves(want, losses(cluster.steps(c.train.steps, c.model.n_loops)), 0.0);
  }
}

TEST_F(ClusterTest, ClusterLayoutsReproduceSingleProcessBitForBitVanillaTiny) {
  expect_layouts_reproduce_single_process(shipped_config("vanilla_tiny.toml", text_data(), 50),
                                          dir_);
}

TEST_F(ClusterTest, ClusterLayoutsReproduceSingleProcessBitForBitLoopMoeTiny) {
  expect_layouts_reproduce_single_process(shipped_config("loopmoe_tiny.toml", text_data(), 50),
                                          dir_);
}

// train.precision = "bf16" reaches every worker and shard (RuntimeBase::apply_process_settings),
// and the CPU's bf16 emulation is batch-invariant too: 2 workers + 2 shards give the single
// process's bf16 curve bit for bit, which is not the fp32 curve.
TEST_F(ClusterTest, Bf16ReproducesSingleProcessBitForBit) {
  // The runtimes set the process-wide precision and leave it; restore fp32 for the next tests.
  const model::ops::MatmulPrecisionScope restore(model::ops::MatmulPrecision::kFp32);
  model::Config c = testing::tiny_loopmoe_config(dir_ / "data");
  c.train.steps = 20;
  c.train.checkpoint_interval = 0;
  c.train.eval_interval = 0;
  c.train.precision = "bf16";
  const std::vector<double> want = single_process_losses(c, dir_ / "single");
  ThreadCluster cluster(c, 2, 2);
  expect_close_curves(want, losses(cluster.steps(c.train.steps, c.model.n_loops)), 0.0);
  model::Config fp32 = c;
  fp32.train.precision = "fp32";
  EXPECT_NE(want, single_process_losses(fp32, dir_ / "fp32"));
}

// Capacity drops walk the global batch in order across workers; 3 workers split 4 sequences
// unevenly (1, 1, 2).
TEST_F(ClusterTest, CapacityDropsAndUnevenSlicesMatchSingleProcess) {
  model::Config c = testing::tiny_loopmoe_config(dir_ / "data");
  c.train.steps = 20;
  c.train.checkpoint_interval = 0;
  c.train.eval_interval = 0;
  const std::vector<double> want = single_process_losses(c, dir_ / "single");
  ThreadCluster cluster(c, 3, 3);
  const std::vector<StepReport> got = cluster.steps(20, c.model.n_loops);
  expect_close_curves(want, losses(got), 1e-5);
  int64_t dropped = 0;
  for (const StepReport& r : got) dropped += r.dropped;
  EXPECT_GT(dropped, 0) << "capacity factor 1.25 should drop something in 20 steps";
}

TEST_F(ClusterTest, ResumeIsBitExactAndRemapsExpertsOntoMoreShards) {
  model::Config c = testing::tiny_loopmoe_config(dir_ / "data");
  c.train.steps = 30;
  std::vector<double> straight;
  double straight_val = 0;
  {
    ThreadCluster cluster(c, 2, 2);
    straight = losses(cluster.steps(30, c.model.n_loops));
    straight_val = cluster.evaluate(2);
  }
  ResumePoint at15;
  std::vector<double> resumed;
  {
    ThreadCluster cluster(c, 2, 2);
    resumed = losses(cluster.steps(15, c.model.n_loops));
    at15 = cluster.checkpoint(dir_ / "ckpt15");
  }
  EXPECT_EQ(at15.step, 15);
  {
    ThreadCluster cluster(c, 2, 2, at15);
    for (double l : losses(cluster.steps(15, c.model.n_loops))) resumed.push_back(l);
    EXPECT_EQ(cluster.evaluate(2), straight_val);
  }
  ASSERT_EQ(resumed.size(), straight.size());
  for (size_t i = 0; i < straight.size(); ++i)
    EXPECT_EQ(resumed[i], straight[i]) << "step " << i + 1;
  // 2 shards → 3 shards (and 2 workers → 1): experts found by global id; next step the same.
  {
    ThreadCluster cluster(c, 1, 3, at15);
    EXPECT_EQ(cluster.steps(1, c.model.n_loops)[0].loss, straight[15]);
  }
}

TEST_F(ClusterTest, CorruptCheckpointFileIsOneClearError) {
  model::Config c = testing::tiny_loopmoe_config(dir_ / "data");
  ResumePoint p;
  {
    ThreadCluster cluster(c, 1, 2);
    cluster.steps(2, c.model.n_loops);
    p = cluster.checkpoint(dir_ / "ckpt");
  }
  const std::string shard_file = p.files[1].path;
  {
    std::fstream f(shard_file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(200);
    f.put('\x7f');
  }
  try {
    ThreadCluster cluster(c, 1, 2, p);
    FAIL() << "corrupt shard file accepted";
  } catch (const model::CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find(shard_file), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("checksum"), std::string::npos) << e.what();
  }
}

// A router with zero weights ties every expert; top-1 then sends every token to expert 0 (lowest
// index wins ties): shard 1 and experts 1.. receive nothing, yet every collective completes.
TEST_F(ClusterTest, RouterSendingEverythingToOneExpertDoesNotHang) {
  model::Config c = testing::tiny_loopmoe_config(dir_ / "data");
  c.model.top_k = 1;
  c.model.capacity_factor = 0;
  ResumePoint p;
  {
    ThreadCluster cluster(c, 2, 2);
    p = cluster.checkpoint(dir_ / "ckpt0");
  }
  // Zero the routers in the worker files (packed replica order = layout order minus experts).
  model::Model m(c.model);
  for (CheckpointFileRef& f : p.files) {
    if (f.role != Role::kWorker) continue;
    WorkerCheckpoint w = read_worker_checkpoint(f.path, f.xxh64);
    size_t packed = 0;
    for (const model::ParamTensor& t : m.layout().tensors()) {
      const bool expert = t.name.find(".moe.w") != std::string::npos;
      if (expert) continue;
      if (t.name.find(".moe.router") != std::string::npos) {
        std::fill_n(w.params.begin() + static_cast<ptrdiff_t>(packed), t.numel(), 0.f);
      }
      packed += t.numel();
    }
    ASSERT_EQ(packed, w.params.size());
    f.xxh64 = write_worker_checkpoint(f.path, w, &f.bytes);
  }
  ThreadCluster cluster(c, 2, 2, p);
  const std::vector<StepReport> r = cluster.steps(1, c.model.n_loops);
  const int E = c.model.n_experts;
  const int64_t tokens = r[0].tokens;
  ASSERT_EQ(r[0].expert_tokens.size(), static_cast<size_t>(E) * c.model.depth());
  for (int a = 0; a < c.model.depth(); ++a) {
    EXPECT_EQ(r[0].expert_tokens[static_cast<size_t>(a) * E], tokens) << "application " << a;
  }
  EXPECT_TRUE(std::isfinite(r[0].loss));
  // And it keeps training (routers learn to spread) without hanging.
  for (const StepReport& s : cluster.steps(3, c.model.n_loops)) EXPECT_TRUE(std::isfinite(s.loss));
}

TEST_F(ClusterTest, VariableLoopCountsPerStep) {
  model::Config c = testing::tiny_loopmoe_config(dir_ / "data");
  ThreadCluster cluster(c, 2, 1);
  for (int loops : {1, 3, 2}) {
    const StepReport r = cluster.steps(1, loops)[0];
    EXPECT_EQ(r.loops, loops);
    EXPECT_EQ(r.expert_tokens.size(),
              static_cast<size_t>(c.model.n_experts) * c.model.n_layers * loops);
    EXPECT_TRUE(std::isfinite(r.loss));
  }
}

TEST_F(ClusterTest, BadSetupIsOneClearError) {
  model::Config c = testing::tiny_loopmoe_config(dir_ / "data");
  comm::InProcessStore store;
  ProcessSetup s;
  s.job_id = "bad";
  s.store = &store;
  s.num_shards = 5;  // 4 experts
  s.config_toml = model::to_toml(c);
  EXPECT_THROW(create_runtime(s), model::ConfigError);
  s.num_shards = 1;
  s.config_toml = "[model]\nd_modle = 3\n";
  try {
    create_runtime(s);
    FAIL();
  } catch (const model::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("d_modle"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace loopmoe::runtime
