// The measured audit of a trained run: counted FLOPs equal the analytic budget, routing counts
// add up, distinct-expert figures are in range.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "eval/audit.h"
#include "tests/tiny_run.h"
#include "train/trainer.h"

namespace loopmoe {
namespace {

namespace fs = std::filesystem;

TEST(Audit, MeasuredFlopsMatchTheBudgetAndRoutingAddsUp) {
  const fs::path root = testing::fresh_test_dir("loopmoe_audit", "run");
  testing::write_pattern_corpus(root / "data");
  model::Config cfg = testing::tiny_loopmoe_config(root / "data");
  cfg.model.capacity_factor = 0;  // dropless: the analytic count assumes every token reaches k
  cfg.model.n_loops = 3;
  train::TrainOptions opt;
  opt.out_dir = (root / "run").string();
  opt.progress = false;
  train::run_training(cfg, opt);
  eval::AuditOptions audit;
  audit.batches = 3;
  const auto j = nlohmann::json::parse(eval::run_audit(opt.out_dir, audit));
  ASSERT_TRUE(fs::exists(root / "run" / "audit.json"));
  const int S = cfg.train.batch_size * cfg.model.seq_len;
  EXPECT_EQ(j["tokens"].get<int64_t>(), 3 * S);
  EXPECT_LT(std::abs(j["flops_per_token"]["relative_diff"].get<double>()), 0.005);
  EXPECT_LT(std::abs(j["flops_per_token_train"]["relative_diff"].get<double>()), 0.005);
  EXPECT_GT(j["attn_ffn_flop_ratio"].get<double>(), 0);
  const int N = cfg.model.n_layers, R = cfg.model.n_loops, k = cfg.model.top_k;
  ASSERT_EQ(j["routing"].size(), static_cast<size_t>(N * R));
  for (const auto& r : j["routing"]) {
    int64_t sum = 0;
    for (const auto& c : r["tokens_per_expert"]) sum += c.get<int64_t>();
    EXPECT_EQ(sum, 3 * S * k);  // every token's k slots, counted before drops
    EXPECT_GE(r["overload"].get<double>(), 1.0);
    EXPECT_EQ(r["dropped"].get<int64_t>(), 0);
  }
  for (const auto& d : j["distinct_experts"]) {
    EXPECT_GE(d["mean"].get<double>(), k);
    EXPECT_LE(d["mean"].get<double>(), d["max_possible"].get<double>());
  }
  fs::remove_all(root);
}

}  // namespace
}  // namespace loopmoe
