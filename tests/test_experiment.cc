// Experiment specs, the planner (run list, equal-effort learning-rate choice), the resumable
// runner (with counting fake train/audit/eval hooks, and once with the real trainer), and the
// report on a fabricated tiny grid, plots included.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "dataloader/token_shard.h"
#include "experiment/experiment.h"
#include "experiment/report.h"
#include "model/error.h"
#include "model/rng.h"
#include "tests/tiny_run.h"

namespace loopmoe {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_file(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary | std::ios::trunc) << text;
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// A small Vanilla MoE that trains in milliseconds.
Config tiny_vanilla(const std::string& data_dir) {
  Config c;
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
SolvedBudget fake_solve(const ModelConfig& v, int loops, Balance balance, IterAdaLNMode mode,
                        double scale) {
  SolvedBudget s;
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
    write_file(root_ / "configs" / "base.toml", to_toml(tiny_vanilla((root_ / "data").string())));
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
  ExperimentSpec spec(const std::string& extra = "", const std::string& variants = "") const {
    return parse_experiment_spec(spec_text(extra, variants),
                                 (root_ / "configs" / "experiments" / "spec.toml").string());
  }

  fs::path root_;
};

void expect_spec_error(const std::string& text, const std::string& needle) {
  try {
    parse_experiment_spec(text, "bad_spec.toml");
    ADD_FAILURE() << "accepted: " << text;
  } catch (const ConfigError& e) {
    EXPECT_TRUE(contains(e.what(), needle)) << e.what();
    EXPECT_TRUE(contains(e.what(), "bad_spec.toml")) << e.what();
  }
}

TEST_F(ExperimentTest, ParsesSpec) {
  const ExperimentSpec s = spec();
  EXPECT_EQ(s.name, "tiny");
  EXPECT_EQ(fs::path(s.base_config), (root_ / "configs" / "base.toml").lexically_normal());
  EXPECT_EQ(s.loops, 2);
  EXPECT_EQ(s.steps, 6);
  EXPECT_EQ(s.seeds, (std::vector<uint64_t>{1, 2}));
  EXPECT_EQ(s.lr_sweep, (std::vector<double>{0.001, 0.003, 0.01}));
  EXPECT_EQ(s.sweep_seed, 7u);
  ASSERT_EQ(s.variants.size(), 3u);
  EXPECT_TRUE(s.variants[0].vanilla());
  EXPECT_EQ(s.variants[0].iter_adaln, IterAdaLNMode::kOff);
  EXPECT_EQ(s.variants[1].iter_adaln, IterAdaLNMode::kJoint);
  EXPECT_EQ(s.variants[1].balance, Balance::kExperts);  // default
  EXPECT_EQ(s.variants[1].expert_scale, 1.0);
  EXPECT_EQ(s.variants[2].iter_adaln, IterAdaLNMode::kOff);
  EXPECT_EQ(s.variants[2].balance, Balance::kNone);
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
  const ExperimentSpec d = load_experiment_spec(dir + "default.toml");
  EXPECT_EQ(d.loops, 4);
  EXPECT_EQ(d.seeds.size(), 3u);
  EXPECT_EQ(d.variants.size(), 8u);
  EXPECT_EQ(d.lr_sweep.size(), 3u);
  EXPECT_TRUE(fs::exists(d.base_config)) << d.base_config;
  ExperimentHooks hooks = default_experiment_hooks();
  hooks.solve = fake_solve;
  const ExperimentPlan plan = plan_experiment(d, hooks);
  EXPECT_EQ(plan.runs.size(), 24u);
  EXPECT_EQ(plan.sweep_runs.size(), 6u);
  const ExperimentSpec s = load_experiment_spec(dir + "smoke.toml");
  EXPECT_EQ(s.variants.size(), 2u);
  EXPECT_EQ(s.seeds.size(), 1u);
  EXPECT_LE(s.steps, 20);
}

// docs/EXPERIMENTS.md documents every spec key as a table row "| `experiment.key` |".
TEST(ExperimentSpec, EveryKeyIsDocumented) {
  const std::string doc = read_all(std::string(LOOPMOE_SOURCE_DIR) + "/docs/EXPERIMENTS.md");
  ASSERT_FALSE(doc.empty()) << "docs/EXPERIMENTS.md missing";
  for (const std::string& key : experiment_spec_keys()) {
    EXPECT_TRUE(contains(doc, "| `" + key + "` |")) << key << " is not documented";
  }
}

TEST_F(ExperimentTest, PlansSweepAndGrid) {
  ExperimentHooks hooks;
  hooks.solve = fake_solve;
  const ExperimentPlan plan = plan_experiment(spec(), hooks);
  // Same candidates for both families, on their reference models, at the sweep seed.
  ASSERT_EQ(plan.sweep_runs.size(), 6u);
  EXPECT_EQ(plan.sweep_runs[0].name, "loopmoe_lr0.001");
  EXPECT_EQ(plan.sweep_runs[0].dir, "sweep/loopmoe_lr0.001");
  EXPECT_EQ(plan.sweep_runs[5].name, "vanilla_lr0.01");
  for (const PlannedRun& r : plan.sweep_runs) {
    EXPECT_TRUE(r.sweep);
    EXPECT_EQ(r.config.train.steps, 4);
    EXPECT_EQ(r.config.train.seed, 7u);
    EXPECT_EQ(r.config.train.eval_interval, 0);
    const ModelConfig& m = r.config.model;
    if (r.family == kLoopMoEFamily) {
      EXPECT_EQ(m.n_loops, 2);
      EXPECT_EQ(m.iter_adaln, IterAdaLNMode::kJoint);  // the reference LoopMoE
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
  EXPECT_EQ(plan.runs[4].config.model.iter_adaln, IterAdaLNMode::kOff);
  EXPECT_EQ(plan.runs[4].config.model.n_experts, 16);  // expert_scale 2
  EXPECT_EQ(plan.runs[4].family, kLoopMoEFamily);
  // Warmup is clamped so a short run still trains mostly at its peak.
  EXPECT_LE(plan.runs[0].config.train.warmup_steps, 6 / 5);

  // One candidate: no sweep, that lr for everyone.
  ExperimentSpec one = spec();
  one.lr_sweep = {0.002};
  EXPECT_TRUE(plan_experiment(one, hooks).sweep_runs.empty());
}

TEST_F(ExperimentTest, RejectsNonVanillaBase) {
  Config looped = tiny_vanilla((root_ / "data").string());
  looped.model.n_loops = 2;
  write_file(root_ / "configs" / "base.toml", to_toml(looped));
  ExperimentHooks hooks;
  hooks.solve = fake_solve;
  try {
    plan_experiment(spec(), hooks);
    ADD_FAILURE() << "accepted a looped base config";
  } catch (const ConfigError& e) {
    EXPECT_TRUE(contains(e.what(), "must be a Vanilla MoE config")) << e.what();
  }
}

TEST(ExperimentPlan, ChoosesLearningRatePerFamily) {
  const std::vector<SweepPoint> points = {
      {"vanilla", 0.001, 4.5}, {"vanilla", 0.003, 4.2}, {"vanilla", 0.01, 4.2},
      {"loopmoe", 0.001, 4.4}, {"loopmoe", 0.003, NAN}, {"loopmoe", 0.01, INFINITY},
  };
  const auto lrs = choose_learning_rates(points);
  EXPECT_EQ(lrs.at("vanilla"), 0.003);  // tie: the earlier candidate
  EXPECT_EQ(lrs.at("loopmoe"), 0.001);  // diverged candidates never win
  EXPECT_THROW(choose_learning_rates({{"loopmoe", 0.01, INFINITY}}), std::runtime_error);
}

// Fake hooks that count calls and write what the real ones would (metrics, checkpoint, JSON).
struct CountingHooks {
  std::map<std::string, int> train_calls, audit_calls, eval_calls;
  std::vector<std::pair<std::string, bool>> resumes;  // (run dir name, resume flag)
  std::map<std::string, double> lr_of;                // run dir name -> lr it trained with
  std::string interrupt;                              // run dir name whose training fails once

  ExperimentHooks hooks() {
    ExperimentHooks h;
    h.solve = fake_solve;
    h.train = [this](const Config& c, const TrainOptions& o) {
      const std::string name = fs::path(o.out_dir).filename().string();
      ++train_calls[name];
      resumes.emplace_back(name, o.resume);
      lr_of[name] = c.train.lr;
      fs::create_directories(o.out_dir);
      write_file(fs::path(o.out_dir) / "config.toml", to_toml(c));
      write_file(fs::path(o.out_dir) / "checkpoint.bin", "ckpt");
      if (name == interrupt) {
        interrupt.clear();
        throw std::runtime_error("simulated crash");
      }
      // Validation loss is lowest at lr 0.003 for vanilla and 0.01 for LoopMoE.
      const double best = c.model.n_loops > 1 ? 0.01 : 0.003;
      const double val = 4.0 + std::fabs(std::log(c.train.lr / best)) + 0.01 * c.train.seed;
      std::ofstream m(fs::path(o.out_dir) / "metrics.jsonl", std::ios::trunc);
      m << "{\"step\": " << c.train.steps << ", \"loss\": " << val + 0.1 << "}\n"
        << "{\"step\": " << c.train.steps << ", \"val_loss\": " << val << "}\n";
    };
    h.audit = [this](const std::string& dir, const AuditOptions&) {
      ++audit_calls[fs::path(dir).filename().string()];
      write_file(fs::path(dir) / "audit.json", "{}");
    };
    h.eval = [this](const std::string& dir, const EvalOptions& o) {
      ++eval_calls[fs::path(dir).filename().string()];
      EXPECT_EQ(o.threads, 1);
      write_file(fs::path(dir) / "eval.json", "{}");
    };
    h.step_seconds = [](const Config&, int) { return StepTiming{0.01, 0.004}; };
    h.figures = [](const ModelConfig&, int) -> BudgetFigures {
      throw std::logic_error("not in this test");
    };
    return h;
  }
};

TEST_F(ExperimentTest, ResumesAndSkipsFinishedRuns) {
  write_file(root_ / "data" / "train.bin", "");  // the runner checks the dataset exists
  const ExperimentSpec s = spec();
  ExperimentOptions opt;
  opt.out_dir = (root_ / "out").string();
  CountingHooks fake;
  fake.interrupt = "loop_joint_s1";
  std::FILE* log = std::tmpfile();
  try {
    run_experiment(s, opt, fake.hooks(), log);
    ADD_FAILURE() << "the interrupted run did not stop the grid";
  } catch (const std::runtime_error& e) {
    EXPECT_TRUE(contains(e.what(), "run loop_joint_s1")) << e.what();
    EXPECT_TRUE(contains(e.what(), "simulated crash")) << e.what();
  }
  // Sweep (6) and the first two main runs finished; the third started and failed.
  EXPECT_EQ(fake.train_calls.size(), 9u);
  EXPECT_EQ(fake.audit_calls.size(), 2u);
  EXPECT_EQ(fake.eval_calls.size(), 2u);
  EXPECT_TRUE(fs::exists(root_ / "out" / "runs" / "vanilla_s2" / "done"));
  EXPECT_FALSE(fs::exists(root_ / "out" / "runs" / "loop_joint_s1" / "done"));
  EXPECT_EQ(fake.lr_of.at("vanilla_s1"), 0.003);  // each family trains at its own best
  const json sweep = json::parse(read_all(root_ / "out" / "sweep.json"));
  EXPECT_EQ(sweep["chosen"]["vanilla"].get<double>(), 0.003);
  EXPECT_EQ(sweep["chosen"]["loopmoe"].get<double>(), 0.01);
  EXPECT_EQ(sweep["points"].size(), 6u);
  EXPECT_EQ(read_all(root_ / "out" / "spec.toml"), s.text);

  // Second invocation: finished runs are skipped, the interrupted one resumes.
  CountingHooks again;
  const ExperimentSummary sum = run_experiment(s, opt, again.hooks(), log);
  EXPECT_EQ(sum.skipped, 8);
  EXPECT_EQ(sum.trained, 4);
  EXPECT_EQ(again.train_calls.size(), 4u);
  EXPECT_EQ(again.train_calls.count("vanilla_s1"), 0u);
  ASSERT_FALSE(again.resumes.empty());
  EXPECT_EQ(again.resumes[0], std::make_pair(std::string("loop_joint_s1"), true));
  EXPECT_FALSE(again.resumes[1].second);
  EXPECT_EQ(again.lr_of.at("loop_off_x2_s2"), 0.01);
  EXPECT_EQ(sum.learning_rates.at("loopmoe"), 0.01);
  const json exp = json::parse(read_all(root_ / "out" / "experiment.json"));
  EXPECT_EQ(exp["runs"].size(), 6u);
  EXPECT_EQ(exp["variants"][1]["lr"].get<double>(), 0.01);

  // Third: nothing left to do.
  CountingHooks idle;
  EXPECT_EQ(run_experiment(s, opt, idle.hooks(), log).skipped, 12);
  EXPECT_TRUE(idle.train_calls.empty());
  EXPECT_TRUE(idle.eval_calls.empty());

  // A changed spec never silently mixes configs in one grid.
  try {
    run_experiment(spec("eval_interval = 3\n"), opt, idle.hooks(), log);
    ADD_FAILURE() << "accepted finished runs of another config";
  } catch (const ConfigError& e) {
    EXPECT_TRUE(contains(e.what(), "was finished with a different config")) << e.what();
    EXPECT_TRUE(contains(e.what(), "train.eval_interval")) << e.what();
  }
  std::fclose(log);
}

TEST_F(ExperimentTest, DryRunPrintsPlanAndTouchesNothing) {
  CountingHooks fake;
  ExperimentOptions opt;
  opt.out_dir = (root_ / "out").string();
  opt.dry_run = true;
  std::FILE* log = std::tmpfile();
  run_experiment(spec(), opt, fake.hooks(), log);
  std::rewind(log);
  std::string text;
  for (int ch; (ch = std::fgetc(log)) != EOF;) text += static_cast<char>(ch);
  std::fclose(log);
  EXPECT_TRUE(fake.train_calls.empty());
  EXPECT_FALSE(fs::exists(root_ / "out"));
  EXPECT_TRUE(contains(text, "loop_off_x2")) << text;
  EXPECT_TRUE(contains(text, "12 runs")) << text;
  EXPECT_TRUE(contains(text, "estimated time")) << text;
}

TEST_F(ExperimentTest, DivergedSweepCandidateIsAResult) {
  write_file(root_ / "data" / "train.bin", "");
  CountingHooks fake;
  ExperimentHooks h = fake.hooks();
  auto inner = h.train;
  h.train = [inner](const Config& c, const TrainOptions& o) {
    if (c.train.lr == 0.01) throw std::runtime_error("loss became nan at step 3");
    inner(c, o);
  };
  ExperimentOptions opt;
  opt.out_dir = (root_ / "out").string();
  std::FILE* log = std::tmpfile();
  const ExperimentSummary sum = run_experiment(spec(), opt, h, log);
  std::fclose(log);
  EXPECT_EQ(sum.learning_rates.at("loopmoe"), 0.003);
  const json sweep = json::parse(read_all(root_ / "out" / "sweep.json"));
  EXPECT_TRUE(sweep["points"][2]["diverged"].get<bool>());
}

// The real trainer end to end (tiny model, a few steps), interrupted once and resumed from its
// checkpoint, then reported.
TEST_F(ExperimentTest, RealTrainingResumesAndReports) {
  write_corpus();
  const ExperimentSpec s = spec("",
                                "[[variant]]\nname = \"vanilla\"\nmodel = \"vanilla\"\n\n"
                                "[[variant]]\nname = \"loop\"\nmodel = \"loopmoe\"\n");
  ExperimentHooks h = default_experiment_hooks();
  h.solve = fake_solve;
  h.audit = [](const std::string& dir, const AuditOptions&) {
    write_file(fs::path(dir) / "audit.json", "{\"routing\": []}");
  };
  h.eval = [](const std::string& dir, const EvalOptions&) {
    write_file(fs::path(dir) / "eval.json", "{}");
  };
  bool interrupted = false;
  ExperimentHooks first = h;
  first.train = [&](const Config& c, const TrainOptions& o) {
    if (!interrupted && fs::path(o.out_dir).filename() == "loop_s1") {
      interrupted = true;
      TrainOptions part = o;
      part.stop_after = 3;  // checkpointed at step 2 and when it stops
      train(c, part);
      throw std::runtime_error("simulated interruption");
    }
    train(c, o);
  };
  ExperimentOptions opt;
  opt.out_dir = (root_ / "out").string();
  std::FILE* log = std::tmpfile();
  EXPECT_THROW(run_experiment(s, opt, first, log), std::runtime_error);
  const ExperimentSummary sum = run_experiment(s, opt, h, log);
  std::fclose(log);
  EXPECT_EQ(sum.trained, 2);  // loop_s1 resumed, loop_s2
  const std::string metrics = read_all(root_ / "out" / "runs" / "loop_s1" / "metrics.jsonl");
  EXPECT_TRUE(contains(metrics, "{\"step\": 6, \"val_loss\""));
  EXPECT_TRUE(std::isfinite(final_val_loss((root_ / "out" / "runs" / "loop_s1").string())));

  ReportOptions ro;
  ro.runs_dir = opt.out_dir;
  ro.plots = false;
  const ReportResult r = write_report(ro);
  const std::string report = read_all(r.report_path);
  EXPECT_TRUE(contains(report, "| vanilla | vanilla | 2 |")) << report;
  EXPECT_TRUE(contains(report, "| loop | loopmoe joint, experts | 2 |")) << report;
}

// ---------------------------------------------------------------------------------------------
// Report

TEST(Report, MeanAndSampleStd) {
  const MeanStd m = mean_std({4.0, 4.2, NAN});
  EXPECT_EQ(m.n, 2);
  EXPECT_NEAR(m.mean, 4.1, 1e-12);
  EXPECT_NEAR(m.std, std::sqrt(0.02), 1e-12);
  EXPECT_EQ(format_mean_std(m, 4), "4.1000 ± 0.1414");
  EXPECT_EQ(format_mean_std(mean_std({0.25}), 1, 100.0), "25.0");
  EXPECT_EQ(format_mean_std(mean_std({}), 3), "n/a");
}

class ReportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() /
            ("loopmoe_report_" + std::to_string(::getpid()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    // 2 variants × 2 seeds with known numbers.
    add_run("vanilla_s1", false, 1, 4.0, 0.30, 0.25);
    add_run("vanilla_s2", false, 2, 4.2, 0.32, 0.27);
    add_run("loop_s1", true, 1, 3.9, 0.35, 0.30);
    add_run("loop_s2", true, 2, 4.0, 0.37, 0.28);
    add_run("loop_s3", true, 3, 0.0, 0, 0, /*done=*/false);  // unfinished: excluded
    write_file(root_ / "sweep.json", R"({"steps": 4, "seed": 7, "candidates": [0.001, 0.003],
      "points": [{"family": "vanilla", "lr": 0.001, "val_loss": 4.6, "diverged": false},
                 {"family": "vanilla", "lr": 0.003, "val_loss": 4.4, "diverged": false},
                 {"family": "loopmoe", "lr": 0.001, "val_loss": 4.3, "diverged": false},
                 {"family": "loopmoe", "lr": 0.003, "val_loss": null, "diverged": true}],
      "chosen": {"vanilla": 0.003, "loopmoe": 0.001}})");
  }
  void TearDown() override { fs::remove_all(root_); }

  void add_run(const std::string& name, bool looped, uint64_t seed, double val, double cloze,
               double mc, bool done = true) {
    const fs::path dir = root_ / "runs" / name;
    Config c = tiny_vanilla("data");
    c.train.steps = 20;
    c.train.seed = seed;
    if (looped) {
      c.model =
          fake_solve(c.model, 2, Balance::kExperts, IterAdaLNMode::kJoint, 1.0).loopmoe_config;
    }
    write_file(dir / "config.toml", to_toml(c));
    std::string metrics;
    for (int step = 10; step <= 20; step += 10) {
      metrics += "{\"step\": " + std::to_string(step) +
                 ", \"loss\": " + std::to_string(val + 1.0 - step / 20.0) +
                 ", \"ce\": 1, \"aux\": 1, \"z\": 1, " +
                 "\"dropped\": 0, \"lr\": 0.003, \"grad_norm\": 1, \"tokens_per_s\": 1000}\n";
      metrics += "{\"step\": " + std::to_string(step) +
                 ", \"val_loss\": " + std::to_string(val + 0.5 - step / 40.0) + "}\n";
    }
    write_file(dir / "metrics.jsonl", metrics);
    if (!done) return;
    const int layers = c.model.n_layers, iters = c.model.n_loops, E = c.model.n_experts;
    json routing = json::array();
    for (int l = 0; l < layers; ++l) {
      for (int r = 0; r < iters; ++r) {
        std::vector<int> tokens(E);
        for (int e = 0; e < E; ++e) tokens[e] = 100 + 10 * ((e + l + r) % 3);
        routing.push_back({{"layer", l},
                           {"iteration", r},
                           {"tokens_per_expert", tokens},
                           {"min", 100},
                           {"max", 120},
                           {"mean", 110},
                           {"std", 8},
                           {"overload", looped ? 1.2 : 1.1},
                           {"dropped", 0}});
      }
    }
    json distinct = json::array();
    for (int l = 0; l < layers; ++l) {
      distinct.push_back({{"layer", l}, {"mean", 3.5}, {"max_possible", std::min(E, 2 * iters)}});
    }
    const json audit = {{"run", name},
                        {"tokens", 1024},
                        {"flops_per_token",
                         {{"measured", 1.0e6},
                          {"analytic", 1.0e6},
                          {"relative_diff", 0.0},
                          {"by_kind",
                           {{"attention_proj", 2e5},
                            {"attention_scores", 1e5},
                            {"router", 1e4},
                            {"experts", 5e5},
                            {"iter_adaln", looped ? 9e4 : 0},
                            {"head", 1e5}}}}},
                        {"attn_ffn_flop_ratio", 0.6},
                        {"dropped", 0},
                        {"routing", routing},
                        {"distinct_experts", distinct}};
    write_file(dir / "audit.json", audit.dump(1));
    json eval = {{"run", name},
                 {"val_loss", val},
                 {"perplexity", std::exp(val)},
                 {"val_tokens", 4096},
                 {"cloze", {{"items", 100}, {"accuracy", cloze}, {"target_loss", 5.0}}},
                 {"multiple_choice", {{"items", 100}, {"accuracy", mc}, {"accuracy_norm", mc}}},
                 {"logit_lens", json::array()},
                 {"loop_sweep", json::array()},
                 {"adaptive", json::array()}};
    if (looped) {
      eval["logit_lens"] = {{{"iteration", 0}, {"loss", val + 1}},
                            {{"iteration", 1}, {"loss", val}}};
      eval["loop_sweep"] = {{{"loops", 1}, {"loss", val + 1}}, {{"loops", 3}, {"loss", val + 0.1}}};
      eval["adaptive"] = {{{"threshold", 0.1}, {"loss", val + 0.05}, {"avg_iterations", 1.5}}};
    }
    write_file(dir / "eval.json", eval.dump(1));
    write_file(dir / "done", "{\"seconds\": 12.5}");
  }

  fs::path root_;
};

bool python_has_matplotlib() {
  return std::system("/usr/bin/python3 -c 'import matplotlib' >/dev/null 2>&1") == 0;
}

TEST_F(ReportTest, WritesTablesAndPlotsOnTinyGrid) {
  ReportOptions opt;
  opt.runs_dir = root_.string();
  opt.plot_script = std::string(LOOPMOE_SOURCE_DIR) + "/scripts/plot_report.py";
  const ReportResult r = write_report(opt);
  EXPECT_EQ(r.report_path, (root_ / "report.md").string());
  const std::string md = read_all(r.report_path);
  // Mean ± sample std over the two seeds: val 4.0/4.2 and 3.9/4.0; accuracies in percent.
  EXPECT_TRUE(contains(md, "| vanilla | vanilla | 2 | 4.1000 ± 0.1414 |")) << md;
  EXPECT_TRUE(contains(md, "| loop | loopmoe joint, ? | 2 | 3.9500 ± 0.0707 |")) << md;
  EXPECT_TRUE(contains(md, "31.0 ± 1.4")) << md;  // vanilla cloze 30% / 32%
  EXPECT_TRUE(contains(md, "loop_s3")) << md;     // listed as not finished
  EXPECT_TRUE(contains(md, "| 0.003 | **4.4000** | diverged |")) << md;
  EXPECT_TRUE(contains(md, "| loop | 1.200 ± 0.000 | 1.200 |")) << md;  // routing overload
  EXPECT_TRUE(contains(md, "r=0")) << md;                               // logit-lens table
  EXPECT_TRUE(contains(md, "| loop | 0.1 | 4.000 ± 0.071 | 1.50 ± 0.00 |")) << md;  // adaptive
  EXPECT_TRUE(fs::exists(r.data_path));
  const json data = json::parse(read_all(r.data_path));
  ASSERT_EQ(data["variants"].size(), 2u);
  // The trained loop count joins the loop sweep as the run's own validation loss.
  EXPECT_EQ(data["variants"][1]["runs"][0]["loop_sweep"].size(), 3u);
  EXPECT_EQ(data["heatmaps"].size(), 2u);
  if (!python_has_matplotlib()) GTEST_SKIP() << "/usr/bin/python3 has no matplotlib";
  EXPECT_EQ(r.plot_note, "");
  for (const char* png : {"val_loss.png", "routing_heatmap.png", "logit_lens.png", "loop_sweep.png",
                          "lr_sweep.png"}) {
    EXPECT_TRUE(fs::exists(root_ / "plots" / png)) << png;
    EXPECT_GT(fs::file_size(root_ / "plots" / png), 1000u) << png;
    EXPECT_TRUE(contains(md, std::string("](plots/") + png + ")")) << png;
  }
}

TEST_F(ReportTest, PlotFailureStillWritesTables) {
  ReportOptions opt;
  opt.runs_dir = root_.string();
  opt.out_file = (root_ / "elsewhere" / "r.md").string();
  opt.plot_script = (root_ / "no_such_script.py").string();
  const ReportResult r = write_report(opt);
  EXPECT_NE(r.plot_note, "");
  const std::string md = read_all(root_ / "elsewhere" / "r.md");
  EXPECT_TRUE(contains(md, "Plots were not drawn")) << md;
  EXPECT_TRUE(contains(md, "4.1000 ± 0.1414")) << md;
}

TEST(Report, EmptyDirectoryIsAnError) {
  const fs::path dir =
      fs::temp_directory_path() / ("loopmoe_report_empty_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  ReportOptions opt;
  opt.runs_dir = dir.string();
  EXPECT_THROW(write_report(opt), ConfigError);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace loopmoe
