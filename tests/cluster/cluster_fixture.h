// Private fixture of the cluster tests (test_cluster_*.cc): W workers and S expert shards of one
// job as threads of this process, the single-process reference, and the ClusterTest fixture.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "comm/in_process_store.h"
#include "model/model.h"
#include "runtime/create_runtime.h"
#include "tests/openblas_coretype.h"
#include "tests/tiny_run.h"
#include "train/trainer.h"

namespace loopmoe::runtime::testing {

// The shared test helpers (tests/tiny_run.h, tests/openblas_coretype.h), so that `testing::`
// names both them and this header's helpers from within loopmoe::runtime.
using namespace ::loopmoe::testing;

namespace fs = std::filesystem;

// Runs fn(i) for i in [0, n) on n threads; rethrows the first exception.
inline void parallel(int n, const std::function<void(int)>& fn) {
  std::vector<std::exception_ptr> errors(n);
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      try {
        fn(i);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

// W workers and S shards of one job as threads of this process.
class ThreadCluster {
 public:
  // `adjust` may change each process's setup before its runtime is built (test hooks).
  ThreadCluster(const model::Config& config, int workers, int shards,
                std::optional<ResumePoint> resume = std::nullopt,
                const std::function<void(ProcessSetup&)>& adjust = nullptr)
      : workers_(workers) {
    static int counter = 0;
    const std::string job = "test" + std::to_string(++counter);
    ns_ = std::make_unique<comm::NamespacedStore>(store_, job, 0);
    runtimes_.resize(workers + shards);
    parallel(workers + shards, [&](int i) {
      ProcessSetup s;
      s.job_id = job;
      s.role = i < workers ? Role::kWorker : Role::kExpertShard;
      s.rank = i < workers ? i : i - workers;
      s.num_workers = workers;
      s.num_shards = shards;
      s.config_toml = model::to_toml(config);
      s.resume = resume;
      s.store = ns_.get();
      s.collective_timeout = std::chrono::seconds(60);
      if (adjust) adjust(s);
      runtimes_[i] = create_runtime(s);
    });
  }
  // Runs `loops` per step, dropping the 0-based steps in `drop` (drop_step); returns worker 0's
  // reports.
  std::vector<StepReport> steps(int n, int loops, const std::set<int64_t>& drop = {}) {
    std::vector<std::vector<StepReport>> all(runtimes_.size());
    parallel(size(), [&](int i) {
      for (int s = 0; s < n; ++s) {
        ProcessRuntime& r = *runtimes_[i];
        all[i].push_back(drop.count(r.steps_done()) ? r.drop_step(loops) : r.step(loops));
      }
    });
    // Every worker reports the same global loss (a dropped step's is NaN on every worker).
    for (int w = 1; w < workers_; ++w) {
      for (int s = 0; s < n; ++s) {
        if (!all[0][s].skipped || std::isfinite(all[0][s].loss)) {
          EXPECT_EQ(all[w][s].loss, all[0][s].loss);
        }
      }
    }
    last_reports_ = all;
    return all[0];
  }
  // Every process's reports of the last steps() call, in process order (workers, then shards).
  const std::vector<std::vector<StepReport>>& last_reports() const { return last_reports_; }
  double evaluate(int batches) {
    std::vector<double> v(size());
    parallel(size(), [&](int i) { v[i] = runtimes_[i]->evaluate(batches); });
    return v[0];
  }
  ResumePoint checkpoint(const fs::path& dir) {
    ResumePoint p;
    p.files.resize(size());
    parallel(size(), [&](int i) { p.files[i] = runtimes_[i]->checkpoint(dir.string()); });
    p.step = runtimes_[0]->steps_done();
    p.sampler = runtimes_[0]->sampler_state();
    return p;
  }
  int size() const { return static_cast<int>(runtimes_.size()); }

 private:
  int workers_;
  comm::InProcessStore store_;
  std::unique_ptr<comm::NamespacedStore> ns_;
  std::vector<std::unique_ptr<ProcessRuntime>> runtimes_;
  std::vector<std::vector<StepReport>> last_reports_;
};

inline std::vector<double> losses(const std::vector<StepReport>& reports) {
  std::vector<double> out;
  for (const StepReport& r : reports) out.push_back(r.loss);
  return out;
}

inline model::Config shipped_config(const char* name, const fs::path& data, int steps) {
  model::Config c = model::load_config(std::string(LOOPMOE_SOURCE_DIR) + "/configs/" + name);
  c.data.dir = data.string();
  c.train.steps = steps;
  c.train.warmup_steps = 10;
  c.train.eval_interval = 0;
  c.train.checkpoint_interval = 0;
  c.train.log_interval = 10;
  return c;
}

inline std::vector<double> single_process_losses(const model::Config& c, const fs::path& out) {
  train::TrainOptions o;
  o.out_dir = out.string();
  o.threads = 1;
  o.progress = false;
  return train::run_training(c, o).losses;
}

inline void expect_close_curves(const std::vector<double>& want, const std::vector<double>& got,
                                double rel) {
  ASSERT_EQ(want.size(), got.size());
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double r = std::abs(got[i] - want[i]) / std::abs(want[i]);
    worst = std::max(worst, r);
    EXPECT_LE(r, rel) << "step " << i + 1 << ": single process " << want[i] << ", cluster "
                      << got[i];
  }
  std::printf("worst relative difference over %zu steps: %.3g\n", want.size(), worst);
  if (std::getenv("LOOPMOE_PRINT_CURVES")) {
    for (size_t i = 0; i < want.size(); ++i) {
      std::printf("%zu %.3g\n", i + 1, std::abs(got[i] - want[i]) / std::abs(want[i]));
    }
  }
}

class ClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (auto why = testing::unsupported_openblas_coretype()) GTEST_SKIP() << *why;
    dir_ = testing::fresh_test_dir("dist",
                                   ::testing::UnitTest::GetInstance()->current_test_info()->name());
    testing::write_pattern_corpus(dir_ / "data");
    model::set_num_threads(1);
  }
  // Text-like data for the shipped configs (vocabulary 4096).
  fs::path text_data() {
    testing::write_zipf_markov_corpus(dir_ / "text", 4096, 400000);
    return dir_ / "text";
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

}  // namespace loopmoe::runtime::testing
