// Shared helpers of the experiment/ tests (test_experiment.cc, test_experiment_runner.cc,
// test_report.cc): file helpers, a tiny Vanilla MoE config, a stand-in for the budget solver and
// the fixture that lays out a spec's directory.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "experiment/experiment.h"
#include "model/budget.h"
#include "model/config.h"
#include "tests/tiny_run.h"

namespace loopmoe::experiment_test {

namespace fs = std::filesystem;

inline std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

inline void write_file(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary | std::ios::trunc) << text;
}

inline bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// A small Vanilla MoE that trains in milliseconds.
inline model::Config tiny_vanilla(const std::string& data_dir) {
  model::Config c;
  c.model.vocab_size = 64;
  c.model.seq_len = 16;
  c.model.d_model = 16;
  c.model.n_heads = 2;
  c.model.head_dim = 8;
  c.model.n_layers = 4;
  c.model.n_experts = 4;
  c.model.expert_hidden = 16;
  c.train.batch_size = 4;
  c.train.warmup_steps = 2;
  c.train.eval_batches = 2;
  c.train.log_interval = 1;
  c.data.dir = data_dir;
  return c;
}

// Stands in for the budget solver: the planner only needs a valid looped config back.
inline model::SolvedBudget fake_solve(const model::ModelConfig& v, int loops,
                                      model::Balance balance, model::IterAdaLNMode mode,
                                      double scale) {
  model::SolvedBudget s;
  s.vanilla_config = v;
  s.loopmoe_config = v;
  s.loopmoe_config.n_layers = v.n_layers / loops;
  s.loopmoe_config.n_loops = loops;
  s.loopmoe_config.iter_adaln = mode;
  s.loopmoe_config.cond_dim = 4;
  s.loopmoe_config.n_experts =
      std::max(v.top_k, static_cast<int>(std::lround(v.n_experts * loops * scale)));
  s.balance = balance;
  s.expert_scale = scale;
  return s;
}

class ExperimentTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() /
            ("loopmoe_experiment_" + std::to_string(::getpid()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    fs::create_directories(root_ / "data");
    write_file(root_ / "configs" / "base.toml",
               model::to_toml(tiny_vanilla((root_ / "data").string())));
  }
  void TearDown() override { fs::remove_all(root_); }

  // A structured synthetic corpus, for the test that really trains.
  void write_corpus() { testing::write_pattern_corpus(root_ / "data"); }

  // The spec file lives in configs/experiments/, as shipped specs do; base_config is relative
  // to it.
  std::string spec_text(const std::string& extra_experiment = "",
                        const std::string& variants = "") const {
    return "[experiment]\nname = \"tiny\"\nbase_config = \"../base.toml\"\nloops = 2\n"
           "steps = 6\nseeds = [1, 2]\nlr_sweep = [0.001, 0.003, 0.01]\nsweep_steps = 4\n"
           "sweep_seed = 7\nthreads = 1\ncheckpoint_interval = 2\n" +
           extra_experiment + "\n" +
           (variants.empty() ? "[[variant]]\nname = \"vanilla\"\nmodel = \"vanilla\"\n\n"
                               "[[variant]]\nname = \"loop_joint\"\nmodel = \"loopmoe\"\n"
                               "iter_adaln = \"joint\"\n\n"
                               "[[variant]]\nname = \"loop_off_x2\"\nmodel = \"loopmoe\"\n"
                               "iter_adaln = \"off\"\nbalance = \"none\"\nexpert_scale = 2.0\n"
                             : variants);
  }
  experiment::ExperimentSpec spec(const std::string& extra = "",
                                  const std::string& variants = "") const {
    return experiment::parse_experiment_spec(
        spec_text(extra, variants), (root_ / "configs" / "experiments" / "spec.toml").string());
  }

  fs::path root_;
};

}  // namespace loopmoe::experiment_test
