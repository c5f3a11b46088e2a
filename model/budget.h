// Parameter and FLOP budgets of a config, and the capacity-balancing solver that turns a Vanilla
// MoE config into a LoopMoE config of equal total parameters, per-token FLOPs and attention:FFN
// active ratio (DESIGN.md §1, docs/BUDGET.md). Analytic FLOPs count exactly the matmuls the
// kernels execute (ops::gemm), so the measured audit can hold them equal.
#pragma once

#include <array>
#include <string>

#include "model/config.h"
#include "model/ops.h"

namespace loopmoe::model {

enum class Balance { kExperts, kWidth, kNone };
const char* to_string(Balance balance);
Balance parse_balance(const std::string& name);  // throws ConfigError

struct BudgetFigures {
  double total_params = 0;
  double active_params_per_token = 0;  // distinct parameters a token's forward touches
  double param_uses_per_token = 0;     // parameter reads per token, each loop application counted
  double flops_per_token_forward = 0;  // matmul FLOPs, as ops::gemm counts them
  double flops_per_token_train = 0;    // forward + backward matmul FLOPs
  double attn_ffn_active_ratio = 0;    // attention params : k · params of one expert, per layer
};

// Analytic figures for a config at `batch_tokens` tokens per batch (seq_len from the config;
// dropless routing, i.e. every token reaches k experts).
BudgetFigures budget_figures(const ModelConfig& config, int batch_tokens);
// Forward matmul FLOPs of one batch of `batch_tokens` tokens, by ops::FlopKind.
std::array<double, static_cast<int>(ops::FlopKind::kCount)> forward_flops_by_kind(
    const ModelConfig& config, int batch_tokens);

struct SolvedBudget {
  ModelConfig vanilla_config, loopmoe_config;
  BudgetFigures vanilla, loopmoe;
  Balance balance = Balance::kExperts;
  double expert_scale = 1.0;
  int batch_tokens = 2048;  // tokens per batch the per-token figures were computed at
  int fixed_cond_dim = 0;   // the cond_dim the caller fixed; 0: searched
};

// LoopMoE counterpart of `vanilla` with `loops` iterations (n_layers = vanilla.n_layers / loops,
// IterAdaLN mode `mode`), balanced by `balance`; expert_scale multiplies the solved expert count
// (ablation: 0.5, 1.5). `cond_dim` > 0 fixes IterAdaLN's conditioning width d_c instead of
// searching it (head_dim and the expert count still are), e.g. to keep the design's 32 where the
// search would shrink d_c to pay for its FLOPs. Throws ConfigError when vanilla.n_layers is not a
// multiple of loops, when `vanilla` is itself looped, when no shape reaches the vanilla's total
// parameters, and for a cond_dim that is odd, below 2, or given with IterAdaLN off.
SolvedBudget solve_budget(const ModelConfig& vanilla, int loops, Balance balance,
                          IterAdaLNMode mode = IterAdaLNMode::kJoint, double expert_scale = 1.0,
                          int batch_tokens = 2048, int cond_dim = 0);

// {"vanilla": {...}, "loopmoe": {...}, "relative_diff": {...}, "loopmoe_config": {...}}
std::string budget_json(const SolvedBudget& solved);

// ---- Additions beyond the original contract (docs/BUDGET.md) ----

// Acceptance bound of the matched figures (total params, training FLOPs, ratio) for the
// `experts` rule; the search aims tighter (docs/BUDGET.md "The search").
inline constexpr double kBudgetTolerance = 0.01;

// Backward matmul FLOPs of one batch, by ops::FlopKind (train = forward + backward).
std::array<double, static_cast<int>(ops::FlopKind::kCount)> backward_flops_by_kind(
    const ModelConfig& config, int batch_tokens);
// loopmoe / vanilla - 1 for every figure (0 where the vanilla figure is 0).
BudgetFigures relative_diff(const BudgetFigures& vanilla, const BudgetFigures& loopmoe);
// Largest |relative diff| over the three matched figures: total params, training FLOPs per
// token, attention:FFN active ratio.
double max_matched_diff(const SolvedBudget& solved);
// The side-by-side table `loopmoe budget` prints (figures, relative diffs, both shapes).
std::string budget_table(const SolvedBudget& solved);

}  // namespace loopmoe::model
