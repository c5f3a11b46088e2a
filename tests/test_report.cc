// The experiment report (`loopmoe report`) on a fabricated tiny grid, plots included.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "dataloader/token_shard.h"
#include "experiment/experiment.h"
#include "experiment/report.h"
#include "experiment/report_internal.h"
#include "model/error.h"
#include "model/rng.h"
#include "tests/experiment_test_util.h"

namespace loopmoe {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using experiment_test::contains;
using experiment_test::fake_solve;
using experiment_test::read_all;
using experiment_test::tiny_vanilla;
using experiment_test::write_file;

TEST(Report, MeanAndSampleStd) {
  const experiment::MeanStd m = experiment::mean_std({4.0, 4.2, NAN});
  EXPECT_EQ(m.n, 2);
  EXPECT_NEAR(m.mean, 4.1, 1e-12);
  EXPECT_NEAR(m.std, std::sqrt(0.02), 1e-12);
  EXPECT_EQ(experiment::format_mean_std(m, 4), "4.1000 ± 0.1414");
  EXPECT_EQ(experiment::format_mean_std(experiment::mean_std({0.25}), 1, 100.0), "25.0");
  EXPECT_EQ(experiment::format_mean_std(experiment::mean_std({}), 3), "n/a");
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
    model::Config c = tiny_vanilla("data");
    c.train.steps = 20;
    c.train.seed = seed;
    if (looped) {
      c.model = fake_solve(c.model, 2, model::Balance::kExperts, model::IterAdaLNMode::kJoint, 1.0)
                    .loopmoe_config;
    }
    write_file(dir / "config.toml", model::to_toml(c));
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
    // Two domains; "notes" is shorter than a window except in the looped runs' (made-up) data.
    eval["domains"] = {{{"name", "speeches"}, {"perplexity", std::exp(val - 0.1 * seed)}},
                       {{"name", "notes"}, {"perplexity", looped ? json(20.0 + seed) : json()}}};
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
  experiment::ReportOptions opt;
  opt.runs_dir = root_.string();
  opt.plot_script = std::string(LOOPMOE_SOURCE_DIR) + "/scripts/plot_report.py";
  const experiment::ReportResult r = experiment::write_report(opt);
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
  // Perplexity per domain: rows domains, columns variants; exp(4.0 - 0.1) / exp(4.2 - 0.2) for
  // vanilla, exp(3.9 - 0.1) / exp(4.0 - 0.2) for loop; notes only in the loop runs (21, 22).
  EXPECT_TRUE(contains(md, "### Perplexity per domain")) << md;
  EXPECT_TRUE(contains(md, "| domain | vanilla | loop |")) << md;
  EXPECT_TRUE(contains(md, "| `speeches` | 52.00 ± 3.67 | 44.70 ± 0.00 |")) << md;
  EXPECT_TRUE(contains(md, "| `notes` |  | 21.50 ± 0.71 |")) << md;
  // Scale and verdict: 3.95 - 4.10 = -0.15 against a spread of 0.1414 + 0.0707.
  EXPECT_TRUE(contains(md, "## Scale and verdict")) << md;
  EXPECT_TRUE(contains(md, "| tokens per run |")) << md;
  EXPECT_TRUE(contains(md, "= -0.1500 nats")) << md;
  EXPECT_TRUE(contains(md, "**does not exceed** the seed spread")) << md;
  EXPECT_TRUE(contains(md, "0.2121); Welch's t = -1.34 with 2 and 2 seeds")) << md;
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
  experiment::ReportOptions opt;
  opt.runs_dir = root_.string();
  opt.out_file = (root_ / "elsewhere" / "r.md").string();
  opt.plot_script = (root_ / "no_such_script.py").string();
  const experiment::ReportResult r = experiment::write_report(opt);
  EXPECT_NE(r.plot_note, "");
  const std::string md = read_all(root_ / "elsewhere" / "r.md");
  EXPECT_TRUE(contains(md, "Plots were not drawn")) << md;
  EXPECT_TRUE(contains(md, "4.1000 ± 0.1414")) << md;
}

TEST(Report, VerdictAgainstSeedSpread) {
  const experiment::MeanStd vanilla{4.0, 0.01, 3}, close{3.99, 0.02, 3}, far{3.9, 0.02, 3};
  const experiment::report_internal::Verdict a =
      experiment::report_internal::compare_to_seed_spread(vanilla, close);
  EXPECT_TRUE(a.comparable);
  EXPECT_FALSE(a.exceeds);  // 0.01 < 0.03
  EXPECT_NEAR(a.difference, -0.01, 1e-12);
  const experiment::report_internal::Verdict b =
      experiment::report_internal::compare_to_seed_spread(vanilla, far);
  EXPECT_TRUE(b.exceeds);  // 0.1 > 0.03
  EXPECT_NEAR(b.welch_t, -0.1 / std::sqrt((0.0001 + 0.0004) / 3), 1e-9);
  const experiment::report_internal::Verdict c =
      experiment::report_internal::compare_to_seed_spread({4.0, NAN, 1}, far);
  EXPECT_FALSE(c.comparable);
  EXPECT_FALSE(c.exceeds);
}

TEST(Report, EmptyDirectoryIsAnError) {
  const fs::path dir =
      fs::temp_directory_path() / ("loopmoe_report_empty_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  experiment::ReportOptions opt;
  opt.runs_dir = dir.string();
  EXPECT_THROW(experiment::write_report(opt), model::ConfigError);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace loopmoe
