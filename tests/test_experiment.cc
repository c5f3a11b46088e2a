// Experiment specs (parsing, shipped specs, documented keys) and the planner (run list,
// equal-effort learning-rate choice). The runner is in test_experiment_runner.cc, the report in
// test_report.cc.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "experiment/experiment.h"
#include "model/error.h"
#include "tests/experiment_test_util.h"

namespace loopmoe {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using experiment_test::contains;
using experiment_test::ExperimentTest;
using experiment_test::fake_solve;
using experiment_test::read_all;
using experiment_test::tiny_vanilla;
using experiment_test::write_file;

void expect_spec_error(const std::string& text, const std::string& needle) {
  try {
    experiment::parse_experiment_spec(text, "bad_spec.toml");
    ADD_FAILURE() << "accepted: " << text;
  } catch (const model::ConfigError& e) {
    EXPECT_TRUE(contains(e.what(), needle)) << e.what();
    EXPECT_TRUE(contains(e.what(), "bad_spec.toml")) << e.what();
  }
}

TEST_F(ExperimentTest, ParsesSpec) {
  const experiment::ExperimentSpec s = spec();
  EXPECT_EQ(s.name, "tiny");
  EXPECT_EQ(fs::path(s.base_config), (root_ / "configs" / "base.toml").lexically_normal());
  EXPECT_EQ(s.loops, 2);
  EXPECT_EQ(s.steps, 6);
  EXPECT_EQ(s.seeds, (std::vector<uint64_t>{1, 2}));
  EXPECT_EQ(s.lr_sweep, (std::vector<double>{0.001, 0.003, 0.01}));
  EXPECT_EQ(s.sweep_seed, 7u);
  ASSERT_EQ(s.variants.size(), 3u);
  EXPECT_TRUE(s.variants[0].vanilla());
  EXPECT_EQ(s.variants[0].iter_adaln, model::IterAdaLNMode::kOff);
  EXPECT_EQ(s.variants[1].iter_adaln, model::IterAdaLNMode::kJoint);
  EXPECT_EQ(s.variants[1].balance, model::Balance::kExperts);  // default
  EXPECT_EQ(s.variants[1].expert_scale, 1.0);
  EXPECT_EQ(s.variants[2].iter_adaln, model::IterAdaLNMode::kOff);
  EXPECT_EQ(s.variants[2].balance, model::Balance::kNone);
  EXPECT_EQ(s.variants[2].expert_scale, 2.0);
}

TEST(ExperimentSpec, RejectsBadInputWithOneClearError) {
  const std::string head = "[experiment]\nbase_config = \"v.toml\"\n";
  const std::string var = "\n[[variant]]\nname = \"v\"\nmodel = \"vanilla\"\n";
  expect_spec_error(head + "stpes = 10\n" + var, "unknown key experiment.stpes");
  expect_spec_error(head + var + "iter_adlan = \"joint\"\n", "unknown key variant[0].iter_adlan");
  expect_spec_error(head + var + "[extra]\nx = 1\n", "unknown section [extra]");
  expect_spec_error("[experiment]\nsteps = 10\n" + var, "experiment.base_config is required");
  expect_spec_error(head + "steps = \"many\"\n" + var, "experiment.steps must be an integer");
  expect_spec_error(head + "steps = 0\n" + var, "experiment.steps = 0 is out of range");
  expect_spec_error(head + "seeds = []\n" + var, "experiment.seeds must not be empty");
  expect_spec_error(head + "seeds = [1, 1]\n" + var, "experiment.seeds holds a value twice");
  expect_spec_error(head + "lr_sweep = [0.003, -1.0]\n" + var, "experiment.lr_sweep holds -1");
  expect_spec_error(head + "lr_sweep = 0.003\n" + var, "experiment.lr_sweep must be an array");
  expect_spec_error(head, "no [[variant]] tables");
  expect_spec_error(head + "\n[[variant]]\nname = \"v\"\nmodel = \"dense\"\n",
                    "model = 'dense' must be \"vanilla\" or \"loopmoe\"");
  expect_spec_error(head + var + var, "name = 'v' is used twice");
  expect_spec_error(head + "\n[[variant]]\nname = \"a/b\"\nmodel = \"vanilla\"\n",
                    "it names run directories");
  expect_spec_error(head + var + "iter_adaln = \"joint\"\n",
                    "variant 'v'.iter_adaln applies to loopmoe variants only");
  expect_spec_error(head +
                        "\n[[variant]]\nname = \"l\"\nmodel = \"loopmoe\"\niter_adaln = "
                        "\"both\"\n",
                    "unknown IterAdaLN mode 'both'");
  expect_spec_error(head + "\n[[variant]]\nname = \"l\"\nmodel = \"loopmoe\"\nbalance = \"all\"\n",
                    "unknown balance rule 'all'");
  expect_spec_error(head +
                        "\n[[variant]]\nname = \"l\"\nmodel = \"loopmoe\"\n"
                        "expert_scale = 0.0\n",
                    "expert_scale = 0 is out of range");
  expect_spec_error("[experiment\n", "bad_spec.toml:1");
}

TEST(ExperimentSpec, ShippedSpecsParseAndPlan) {
  const std::string dir = std::string(LOOPMOE_SOURCE_DIR) + "/configs/experiments/";
  const experiment::ExperimentSpec d = experiment::load_experiment_spec(dir + "default.toml");
  EXPECT_EQ(d.loops, 4);
  EXPECT_EQ(d.seeds.size(), 3u);
  EXPECT_EQ(d.variants.size(), 8u);
  EXPECT_EQ(d.lr_sweep.size(), 3u);
  EXPECT_TRUE(fs::exists(d.base_config)) << d.base_config;
  experiment::ExperimentHooks hooks = experiment::default_experiment_hooks();
  hooks.solve = fake_solve;
  const experiment::ExperimentPlan plan = experiment::plan_experiment(d, hooks);
  EXPECT_EQ(plan.runs.size(), 24u);
  EXPECT_EQ(plan.sweep_runs.size(), 6u);
  const experiment::ExperimentSpec s = experiment::load_experiment_spec(dir + "smoke.toml");
  EXPECT_EQ(s.variants.size(), 2u);
  EXPECT_EQ(s.seeds.size(), 1u);
  EXPECT_LE(s.steps, 20);

  // The GPU comparison (issue 10), planned with the real solver: 3 seeds x >= 50M tokens for
  // vanilla and the reference LoopMoE, one seed x >= 10M tokens for each ablation.
  const experiment::ExperimentSpec g = experiment::load_experiment_spec(dir + "gpu.toml");
  const experiment::ExperimentPlan gp =
      experiment::plan_experiment(g, experiment::default_experiment_hooks());
  EXPECT_EQ(gp.sweep_runs.size(), 6u);
  ASSERT_EQ(gp.runs.size(), 11u);
  for (const experiment::PlannedRun& r : gp.runs) {
    const int64_t tokens =
        int64_t{r.config.train.steps} * r.config.train.batch_size * r.config.model.seq_len;
    const bool main = r.variant == "vanilla" || r.variant == "loop_joint";
    EXPECT_GE(tokens, main ? 50'000'000 : 10'000'000) << r.name;
    EXPECT_EQ(fs::path(r.config.data.dir).filename(), "corpus") << r.name;
  }
}

// docs/EXPERIMENTS.md documents every spec key as a table row "| `experiment.key` |".
TEST(ExperimentSpec, EveryKeyIsDocumented) {
  const std::string doc = read_all(std::string(LOOPMOE_SOURCE_DIR) + "/docs/EXPERIMENTS.md");
  ASSERT_FALSE(doc.empty()) << "docs/EXPERIMENTS.md missing";
  for (const std::string& key : experiment::experiment_spec_keys()) {
    EXPECT_TRUE(contains(doc, "| `" + key + "` |")) << key << " is not documented";
  }
}

TEST_F(ExperimentTest, VariantStepsAndSeedsOverrideTheExperiments) {
  experiment::ExperimentHooks hooks;
  hooks.solve = fake_solve;
  const std::string variants =
      "[[variant]]\nname = \"vanilla\"\nmodel = \"vanilla\"\n\n"
      "[[variant]]\nname = \"loop_off\"\nmodel = \"loopmoe\"\niter_adaln = \"off\"\n"
      "steps = 3\nseeds = [9]\n";
  const experiment::ExperimentPlan plan = experiment::plan_experiment(spec("", variants), hooks);
  ASSERT_EQ(plan.runs.size(), 3u);
  EXPECT_EQ(plan.runs[0].name, "vanilla_s1");
  EXPECT_EQ(plan.runs[0].config.train.steps, 6);
  EXPECT_EQ(plan.runs[1].name, "vanilla_s2");
  EXPECT_EQ(plan.runs[2].name, "loop_off_s9");
  EXPECT_EQ(plan.runs[2].config.train.steps, 3);
  EXPECT_EQ(plan.runs[2].config.train.seed, 9u);
  for (const char* bad : {"steps = 0\n", "seeds = []\n"}) {
    try {
      spec("", "[[variant]]\nname = \"loop_off\"\nmodel = \"loopmoe\"\n" + std::string(bad));
      ADD_FAILURE() << "accepted " << bad;
    } catch (const model::ConfigError& e) {
      EXPECT_TRUE(contains(e.what(), "variant 'loop_off'")) << e.what();
    }
  }
}

TEST_F(ExperimentTest, PlansSweepAndGrid) {
  experiment::ExperimentHooks hooks;
  hooks.solve = fake_solve;
  const experiment::ExperimentPlan plan = experiment::plan_experiment(spec(), hooks);
  // Same candidates for both families, on their reference models, at the sweep seed.
  ASSERT_EQ(plan.sweep_runs.size(), 6u);
  EXPECT_EQ(plan.sweep_runs[0].name, "loopmoe_lr0.001");
  EXPECT_EQ(plan.sweep_runs[0].dir, "sweep/loopmoe_lr0.001");
  EXPECT_EQ(plan.sweep_runs[5].name, "vanilla_lr0.01");
  for (const experiment::PlannedRun& r : plan.sweep_runs) {
    EXPECT_TRUE(r.sweep);
    EXPECT_EQ(r.config.train.steps, 4);
    EXPECT_EQ(r.config.train.seed, 7u);
    EXPECT_EQ(r.config.train.eval_interval, 0);
    const model::ModelConfig& m = r.config.model;
    if (r.family == experiment::kLoopMoEFamily) {
      EXPECT_EQ(m.n_loops, 2);
      EXPECT_EQ(m.iter_adaln, model::IterAdaLNMode::kJoint);  // the reference LoopMoE
      EXPECT_EQ(m.n_experts, 8);
    } else {
      EXPECT_EQ(m.n_loops, 1);
    }
  }
  ASSERT_EQ(plan.runs.size(), 6u);
  const std::vector<std::string> names = {"vanilla_s1",    "vanilla_s2",     "loop_joint_s1",
                                          "loop_joint_s2", "loop_off_x2_s1", "loop_off_x2_s2"};
  for (size_t i = 0; i < names.size(); ++i) {
    EXPECT_EQ(plan.runs[i].name, names[i]);
    EXPECT_EQ(plan.runs[i].dir, "runs/" + names[i]);
    EXPECT_EQ(plan.runs[i].config.train.steps, 6);
    EXPECT_EQ(plan.runs[i].config.train.checkpoint_interval, 2);
    EXPECT_TRUE(std::isnan(plan.runs[i].config.train.lr));  // until the sweep has chosen
  }
  EXPECT_EQ(plan.runs[1].config.train.seed, 2u);
  EXPECT_EQ(plan.runs[0].config.model.n_layers, 4);
  EXPECT_EQ(plan.runs[4].config.model.iter_adaln, model::IterAdaLNMode::kOff);
  EXPECT_EQ(plan.runs[4].config.model.n_experts, 16);  // expert_scale 2
  EXPECT_EQ(plan.runs[4].family, experiment::kLoopMoEFamily);
  // Warmup is clamped so a short run still trains mostly at its peak.
  EXPECT_LE(plan.runs[0].config.train.warmup_steps, 6 / 5);

  // One candidate: no sweep, that lr for everyone.
  experiment::ExperimentSpec one = spec();
  one.lr_sweep = {0.002};
  EXPECT_TRUE(experiment::plan_experiment(one, hooks).sweep_runs.empty());
}

TEST_F(ExperimentTest, RejectsNonVanillaBase) {
  model::Config looped = tiny_vanilla((root_ / "data").string());
  looped.model.n_loops = 2;
  write_file(root_ / "configs" / "base.toml", model::to_toml(looped));
  experiment::ExperimentHooks hooks;
  hooks.solve = fake_solve;
  try {
    experiment::plan_experiment(spec(), hooks);
    ADD_FAILURE() << "accepted a looped base config";
  } catch (const model::ConfigError& e) {
    EXPECT_TRUE(contains(e.what(), "must be a Vanilla MoE config")) << e.what();
  }
}

TEST(ExperimentPlan, ChoosesLearningRatePerFamily) {
  const std::vector<experiment::SweepPoint> points = {
      {"vanilla", 0.001, 4.5}, {"vanilla", 0.003, 4.2}, {"vanilla", 0.01, 4.2},
      {"loopmoe", 0.001, 4.4}, {"loopmoe", 0.003, NAN}, {"loopmoe", 0.01, INFINITY},
  };
  const auto lrs = experiment::choose_learning_rates(points);
  EXPECT_EQ(lrs.at("vanilla"), 0.003);  // tie: the earlier candidate
  EXPECT_EQ(lrs.at("loopmoe"), 0.001);  // diverged candidates never win
  EXPECT_THROW(experiment::choose_learning_rates({{"loopmoe", 0.01, INFINITY}}),
               std::runtime_error);
}

}  // namespace
}  // namespace loopmoe
