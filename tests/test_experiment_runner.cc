// The resumable experiment runner, with counting fake train/audit/eval hooks, and once with the
// real trainer.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "experiment/experiment.h"
#include "experiment/report.h"
#include "model/error.h"
#include "tests/experiment_test_util.h"
#include "tests/tiny_run.h"

namespace loopmoe {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using experiment_test::contains;
using experiment_test::ExperimentTest;
using experiment_test::fake_solve;
using experiment_test::read_all;
using experiment_test::write_file;

// Fake hooks that count calls and write what the real ones would (metrics, checkpoint, JSON).
struct CountingHooks {
  std::map<std::string, int> train_calls, audit_calls, eval_calls;
  std::vector<std::pair<std::string, bool>> resumes;  // (run dir name, resume flag)
  std::map<std::string, double> lr_of;                // run dir name -> lr it trained with
  std::string interrupt;                              // run dir name whose training fails once

  experiment::ExperimentHooks hooks() {
    experiment::ExperimentHooks h;
    h.solve = fake_solve;
    h.train = [this](const model::Config& c, const train::TrainOptions& o) {
      const std::string name = fs::path(o.out_dir).filename().string();
      ++train_calls[name];
      resumes.emplace_back(name, o.resume);
      lr_of[name] = c.train.lr;
      fs::create_directories(o.out_dir);
      write_file(fs::path(o.out_dir) / "config.toml", model::to_toml(c));
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
    h.audit = [this](const std::string& dir, const eval::AuditOptions&) {
      ++audit_calls[fs::path(dir).filename().string()];
      write_file(fs::path(dir) / "audit.json", "{}");
    };
    h.eval = [this](const std::string& dir, const eval::EvalOptions& o) {
      ++eval_calls[fs::path(dir).filename().string()];
      EXPECT_EQ(o.threads, 1);
      write_file(fs::path(dir) / "eval.json", "{}");
    };
    h.step_seconds = [](const model::Config&, int) { return experiment::StepTiming{0.01, 0.004}; };
    h.figures = [](const model::ModelConfig&, int) -> model::BudgetFigures {
      throw std::logic_error("not in this test");
    };
    return h;
  }
};

TEST_F(ExperimentTest, ResumesAndSkipsFinishedRuns) {
  write_file(root_ / "data" / "train.bin", "");  // the runner checks the dataset exists
  const experiment::ExperimentSpec s = spec();
  experiment::ExperimentOptions opt;
  opt.out_dir = (root_ / "out").string();
  CountingHooks fake;
  fake.interrupt = "loop_joint_s1";
  std::FILE* log = std::tmpfile();
  try {
    experiment::run_experiment(s, opt, fake.hooks(), log);
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
  const experiment::ExperimentSummary sum = experiment::run_experiment(s, opt, again.hooks(), log);
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
  EXPECT_EQ(experiment::run_experiment(s, opt, idle.hooks(), log).skipped, 12);
  EXPECT_TRUE(idle.train_calls.empty());
  EXPECT_TRUE(idle.eval_calls.empty());

  // A changed spec never silently mixes configs in one grid.
  try {
    experiment::run_experiment(spec("eval_interval = 3\n"), opt, idle.hooks(), log);
    ADD_FAILURE() << "accepted finished runs of another config";
  } catch (const model::ConfigError& e) {
    EXPECT_TRUE(contains(e.what(), "was finished with a different config")) << e.what();
    EXPECT_TRUE(contains(e.what(), "train.eval_interval")) << e.what();
  }
  std::fclose(log);
}

TEST_F(ExperimentTest, TimeLimitLeavesWholeRunsForTheNextInvocation) {
  // A fake clock: training takes one second per step, audit one and eval two.
  write_file(root_ / "data" / "train.bin", "");
  const experiment::ExperimentSpec s = spec();  // sweep 6 x 4 steps, then 6 runs x 6 steps
  experiment::ExperimentOptions opt;
  opt.out_dir = (root_ / "out").string();
  double clock = 100;
  auto timed = [&clock](CountingHooks& fake) {
    experiment::ExperimentHooks h = fake.hooks();
    h.now_seconds = [&clock] { return clock; };
    h.train = [&clock, train = h.train](const model::Config& c, const train::TrainOptions& o) {
      train(c, o);
      clock += c.train.steps;
    };
    h.audit = [&clock, audit = h.audit](const std::string& d, const eval::AuditOptions& o) {
      audit(d, o);
      clock += 1;
    };
    h.eval = [&clock, eval = h.eval](const std::string& d, const eval::EvalOptions& o) {
      eval(d, o);
      clock += 2;
    };
    return h;
  };
  std::FILE* log = std::tmpfile();

  // 10 s: two sweep runs (4 s each); the third would end at 12 s. Without every sweep point no
  // main run may start, and sweep.json is not written.
  opt.time_limit = 10;
  CountingHooks first;
  experiment::ExperimentSummary sum = experiment::run_experiment(s, opt, timed(first), log);
  EXPECT_EQ(sum.trained, 2);
  EXPECT_EQ(sum.remaining, 10);
  EXPECT_FALSE(fs::exists(root_ / "out" / "sweep.json"));

  // 40 s: the four sweep runs left (16 s), then main runs of 6 s + 3 s of audit and eval: the
  // first (est. 6 s: no eval timed yet) ends at 25 s, the second at 34 s; the third (est. 9 s)
  // would end at 43 s.
  opt.time_limit = 40;
  CountingHooks second;
  sum = experiment::run_experiment(s, opt, timed(second), log);
  EXPECT_EQ(sum.skipped, 2);
  EXPECT_EQ(sum.trained, 6);
  EXPECT_EQ(sum.remaining, 4);
  EXPECT_TRUE(fs::exists(root_ / "out" / "sweep.json"));
  EXPECT_EQ(second.eval_calls.size(), 2u);

  // No limit: the rest, and nothing was trained twice.
  opt.time_limit = 0;
  CountingHooks third;
  sum = experiment::run_experiment(s, opt, timed(third), log);
  EXPECT_EQ(sum.trained, 4);
  EXPECT_EQ(sum.remaining, 0);
  EXPECT_EQ(first.train_calls.size() + second.train_calls.size() + third.train_calls.size(), 12u);
  for (const auto* f : {&first, &second, &third}) {
    for (const auto& [name, resume] : f->resumes) EXPECT_FALSE(resume) << name;
  }
  std::fclose(log);
}

TEST_F(ExperimentTest, DryRunPrintsPlanAndTouchesNothing) {
  CountingHooks fake;
  experiment::ExperimentOptions opt;
  opt.out_dir = (root_ / "out").string();
  opt.dry_run = true;
  std::FILE* log = std::tmpfile();
  experiment::run_experiment(spec(), opt, fake.hooks(), log);
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
  experiment::ExperimentHooks h = fake.hooks();
  auto inner = h.train;
  h.train = [inner](const model::Config& c, const train::TrainOptions& o) {
    if (c.train.lr == 0.01) throw std::runtime_error("loss became nan at step 3");
    inner(c, o);
  };
  experiment::ExperimentOptions opt;
  opt.out_dir = (root_ / "out").string();
  std::FILE* log = std::tmpfile();
  const experiment::ExperimentSummary sum = experiment::run_experiment(spec(), opt, h, log);
  std::fclose(log);
  EXPECT_EQ(sum.learning_rates.at("loopmoe"), 0.003);
  const json sweep = json::parse(read_all(root_ / "out" / "sweep.json"));
  EXPECT_TRUE(sweep["points"][2]["diverged"].get<bool>());
}

// The real trainer end to end (tiny model, a few steps), interrupted once and resumed from its
// checkpoint, then reported.
TEST_F(ExperimentTest, RealTrainingResumesAndReports) {
  write_corpus();
  const experiment::ExperimentSpec s =
      spec("",
           "[[variant]]\nname = \"vanilla\"\nmodel = \"vanilla\"\n\n"
           "[[variant]]\nname = \"loop\"\nmodel = \"loopmoe\"\n");
  experiment::ExperimentHooks h = experiment::default_experiment_hooks();
  h.solve = fake_solve;
  h.audit = [](const std::string& dir, const eval::AuditOptions&) {
    write_file(fs::path(dir) / "audit.json", "{\"routing\": []}");
  };
  h.eval = [](const std::string& dir, const eval::EvalOptions&) {
    write_file(fs::path(dir) / "eval.json", "{}");
  };
  bool interrupted = false;
  experiment::ExperimentHooks first = h;
  first.train = [&](const model::Config& c, const train::TrainOptions& o) {
    if (!interrupted && fs::path(o.out_dir).filename() == "loop_s1") {
      interrupted = true;
      train::TrainOptions part = o;
      part.stop_after = 3;  // checkpointed at step 2 and when it stops
      train::run_training(c, part);
      throw std::runtime_error("simulated interruption");
    }
    train::run_training(c, o);
  };
  experiment::ExperimentOptions opt;
  opt.out_dir = (root_ / "out").string();
  std::FILE* log = std::tmpfile();
  EXPECT_THROW(experiment::run_experiment(s, opt, first, log), std::runtime_error);
  const experiment::ExperimentSummary sum = experiment::run_experiment(s, opt, h, log);
  std::fclose(log);
  EXPECT_EQ(sum.trained, 2);  // loop_s1 resumed, loop_s2
  const std::string metrics = read_all(root_ / "out" / "runs" / "loop_s1" / "metrics.jsonl");
  EXPECT_TRUE(contains(metrics, "{\"step\": 6, \"val_loss\""));
  EXPECT_TRUE(
      std::isfinite(experiment::final_val_loss((root_ / "out" / "runs" / "loop_s1").string())));

  experiment::ReportOptions ro;
  ro.runs_dir = opt.out_dir;
  ro.plots = false;
  const experiment::ReportResult r = experiment::write_report(ro);
  const std::string report = read_all(r.report_path);
  EXPECT_TRUE(contains(report, "| vanilla | vanilla | 2 |")) << report;
  EXPECT_TRUE(contains(report, "| loop | loopmoe joint, experts | 2 |")) << report;
}

}  // namespace
}  // namespace loopmoe
