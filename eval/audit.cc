#include "eval/audit.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <numeric>
#include <set>
#include <vector>

#include "common/atomic_file.h"
#include "dataloader/sampler.h"
#include "dataloader/token_shard.h"
#include "model/budget.h"
#include "model/model.h"
#include "model/ops.h"
#include "train/checkpoint.h"

namespace loopmoe::eval {
namespace {

namespace fs = std::filesystem;
constexpr int kKinds = static_cast<int>(model::ops::FlopKind::kCount);

}  // namespace

std::string run_audit(const std::string& run_dir, const AuditOptions& options) {
  const fs::path dir(run_dir);
  const std::string ckpt = (dir / "checkpoint.bin").string();
  model::set_num_threads(options.threads);
  model::Config cfg;
  const std::unique_ptr<model::Model> loaded = train::load_model(ckpt, &cfg);
  model::Model& model = *loaded;
  const dataloader::TokenShard val =
      dataloader::TokenShard::open(fs::path(cfg.data.dir) / "val.bin");
  const int B = cfg.train.batch_size, T = cfg.model.seq_len, S = B * T;
  const int N = cfg.model.n_layers, R = cfg.model.n_loops, E = cfg.model.n_experts;
  const int k = cfg.model.top_k;
  dataloader::BatchSampler sampler(val, B, T, 0, dataloader::WindowOrder::kSpread);
  std::vector<int32_t> in(S), tg(S);

  std::vector<double> fwd_by_kind(kKinds, 0.0);
  std::vector<std::vector<int64_t>> assigned(N * R, std::vector<int64_t>(E, 0));
  std::vector<int64_t> dropped(N * R, 0);
  std::vector<double> distinct_sum(N, 0.0);
  double train_flops = 0;
  int64_t tokens = 0;
  for (int b = 0; b < options.batches; ++b) {
    sampler.next(in.data(), tg.data());
    model::ops::reset_gemm_flops();
    model.forward(in.data(), tg.data(), B, T);
    for (int kind = 0; kind < kKinds; ++kind) {
      fwd_by_kind[kind] +=
          static_cast<double>(model::ops::gemm_flops(static_cast<model::ops::FlopKind>(kind)));
    }
    if (b == 0) {  // one backward measures the training FLOPs (forward + backward)
      model.zero_grad();
      model.backward();
      train_flops = static_cast<double>(model::ops::gemm_flops()) / S;
    }
    tokens += S;
    for (int a = 0; a < N * R; ++a) {
      const model::RoutingPlan& plan = model.routing(a);
      for (int e = 0; e < E; ++e) assigned[a][e] += plan.assigned[e];
      dropped[a] += plan.dropped;
    }
    // Distinct experts a token visits at unique layer n over the R iterations.
    for (int n = 0; n < N; ++n) {
      for (int t = 0; t < S; ++t) {
        std::set<int32_t> seen;
        for (int r = 0; r < R; ++r) {
          const model::RoutingPlan& plan = model.routing(r * N + n);
          for (int j = 0; j < k; ++j) seen.insert(plan.expert[static_cast<size_t>(t) * k + j]);
        }
        distinct_sum[n] += static_cast<double>(seen.size());
      }
    }
  }

  nlohmann::json j;
  j["run"] = dir.filename().string().empty() ? dir.parent_path().filename().string()
                                             : dir.filename().string();
  j["tokens"] = tokens;
  const auto analytic_kind = model::forward_flops_by_kind(cfg.model, S);
  const model::BudgetFigures fig = model::budget_figures(cfg.model, S);
  double measured = 0;
  nlohmann::json by_kind, analytic_by_kind;
  for (int kind = 0; kind < kKinds; ++kind) {
    const char* name = model::ops::to_string(static_cast<model::ops::FlopKind>(kind));
    by_kind[name] = fwd_by_kind[kind] / tokens;
    analytic_by_kind[name] = analytic_kind[kind] / S;
    measured += fwd_by_kind[kind] / tokens;
  }
  j["flops_per_token"] = {{"measured", measured},
                          {"analytic", fig.flops_per_token_forward},
                          {"relative_diff", measured / fig.flops_per_token_forward - 1.0},
                          {"by_kind", by_kind},
                          {"analytic_by_kind", analytic_by_kind}};
  j["flops_per_token_train"] = {{"measured", train_flops},
                                {"analytic", fig.flops_per_token_train},
                                {"relative_diff", train_flops / fig.flops_per_token_train - 1.0}};
  const auto kind_flops = [&](model::ops::FlopKind kind) {
    return fwd_by_kind[static_cast<int>(kind)];
  };
  const double attn = kind_flops(model::ops::FlopKind::kAttentionProj) +
                      kind_flops(model::ops::FlopKind::kAttentionScores);
  j["attn_ffn_flop_ratio"] = attn / std::max(1.0, kind_flops(model::ops::FlopKind::kExperts));
  int64_t total_dropped = 0;
  nlohmann::json routing = nlohmann::json::array();
  for (int a = 0; a < N * R; ++a) {
    const auto& c = assigned[a];
    const double mean = std::accumulate(c.begin(), c.end(), 0.0) / E;
    double var = 0;
    for (int64_t x : c) var += (x - mean) * (x - mean);
    const int64_t mn = *std::min_element(c.begin(), c.end());
    const int64_t mx = *std::max_element(c.begin(), c.end());
    routing.push_back({{"layer", a % N},
                       {"iteration", a / N},
                       {"tokens_per_expert", c},
                       {"min", mn},
                       {"max", mx},
                       {"mean", mean},
                       {"std", std::sqrt(var / E)},
                       {"overload", mean > 0 ? mx / mean : 0.0},
                       {"dropped", dropped[a]}});
    total_dropped += dropped[a];
  }
  j["dropped"] = total_dropped;
  j["routing"] = routing;
  nlohmann::json distinct = nlohmann::json::array();
  for (int n = 0; n < N; ++n) {
    distinct.push_back(
        {{"layer", n}, {"mean", distinct_sum[n] / tokens}, {"max_possible", std::min(E, k * R)}});
  }
  j["distinct_experts"] = distinct;
  const std::string text = j.dump(2);
  // Written whole and renamed, so a reader never sees half a file.
  common::write_file_atomically(dir / "audit.json", text + "\n");
  return text;
}

}  // namespace loopmoe::eval
