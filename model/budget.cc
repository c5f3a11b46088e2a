// Budget figures and the capacity-balancing solver (DESIGN.md §1, docs/BUDGET.md).
//
// The FLOP formulas below mirror, call by call, the ops::gemm calls of model.cc, iter_adaln.cc,
// moe_layer.cc, router.cc and experts.cc (2·m·n·k each), so that the analytic figures equal what
// the kernels count; tests/test_budget.cc holds them equal on real batches.
#include "model/budget.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "model/error.h"
#include "model/param_layout.h"

namespace loopmoe::model {
namespace {

constexpr int kKinds = static_cast<int>(ops::FlopKind::kCount);
using KindFlops = std::array<double, kKinds>;

// The search prefers the least compensation (widest attention and experts) among shapes whose
// three matched figures all land within this bound; only when none does, it falls back to the
// smallest worst-case difference. Half the acceptance bound, so the solved pair has margin.
constexpr double kSearchTarget = 0.005;

double& at(KindFlops& f, ops::FlopKind kind) { return f[static_cast<int>(kind)]; }

// Parameters of one norm block (docs/MODEL.md "Parameters"): what every token of the sublayer
// reads, IterAdaLN's MLP_iter included.
double norm_block_params(const ModelConfig& c) {
  const double d = c.d_model, dc = c.cond_dim;
  if (!c.adaln()) return d;
  double n = dc * 3 * d + 3 * d;                       // mod_w, mod_b
  if (c.adaln_iter_term()) n += 2 * dc * dc + 2 * dc;  // iter_w1, iter_b1, iter_w2, iter_b2
  if (c.adaln_token_term()) n += d * dc;               // tok_w
  return n;
}

double attention_params(const ModelConfig& c) {  // A = wqkv + wo
  return 4.0 * c.d_model * c.attn_inner();
}
double expert_params(const ModelConfig& c) {  // P_e: w1, w3, w2 of one SwiGLU expert
  return 3.0 * c.d_model * c.expert_hidden;
}
double router_params(const ModelConfig& c) { return static_cast<double>(c.d_model) * c.n_experts; }

// Embedding, final norm and (untied) LM head: touched by every token once.
double outer_params(const ModelConfig& c) {
  const double vd = static_cast<double>(c.vocab_size) * c.d_model;
  return vd + c.d_model + (c.tie_embeddings ? 0 : vd);
}

// Parameters one layer application reads for one token: attention, router, both norm blocks,
// and the k experts the token is routed to.
double layer_active_params(const ModelConfig& c) {
  return attention_params(c) + router_params(c) + 2 * norm_block_params(c) +
         c.top_k * expert_params(c);
}

// Closed form of ParamLayout(c).size(); the search evaluates thousands of shapes and this avoids
// building a layout for each. solve_budget checks it against ParamLayout for the shape it returns.
double analytic_total_params(const ModelConfig& c) {
  const double layer = attention_params(c) + router_params(c) + 2 * norm_block_params(c) +
                       static_cast<double>(c.n_experts) * expert_params(c);
  return outer_params(c) + c.n_layers * layer;
}

KindFlops flops_by_kind(const ModelConfig& c, int batch_tokens, bool backward) {
  const double S = batch_tokens, d = c.d_model, I = c.attn_inner(), T = c.seq_len;
  const double E = c.n_experts, k = c.top_k, f = c.expert_hidden, dc = c.cond_dim;
  const double V = c.vocab_size, L = c.depth();
  KindFlops fl{};
  // Each kind: (gemm calls) × 2·m·n·k. Per forward gemm, matmul_backward runs two of the same
  // size (one when it skips the input gradient), attention_backward two, swiglu_backward two.
  // Attention: qkv S×d×3I and output S×I×d; backward computes both dinp and dw.
  at(fl, ops::FlopKind::kAttentionProj) =
      L * (backward ? 2 : 1) * (2 * S * d * 3 * I + 2 * S * I * d);
  // Scores per (sequence, head): QK^T T×T×hd and PV T×hd×T over the full T×T block
  // (B·H·T²·hd = S·T·I); backward: dP, dV, dQ, dK.
  at(fl, ops::FlopKind::kAttentionScores) = L * (backward ? 4 : 2) * 2 * S * T * I;
  at(fl, ops::FlopKind::kRouter) = L * (backward ? 2 : 1) * 2 * S * d * E;
  // Dropless: S·k rows reach the experts; forward w1, w3, w2; backward six gemms.
  at(fl, ops::FlopKind::kExperts) = L * (backward ? 6 : 3) * 2 * S * k * d * f;
  if (c.adaln()) {
    // Per norm block (two per layer application): modulation S×dc×3d; token term S×d×dc;
    // MLP_iter two 1×dc×dc products per block and iteration, whatever the number of tokens. Its
    // backward skips the input gradient of iter_w1 (the encoding is a constant): 3 gemms.
    double block = 2 * S * dc * 3 * d * (backward ? 2 : 1);
    if (c.adaln_token_term()) block += 2 * S * d * dc * (backward ? 2 : 1);
    if (c.adaln_iter_term()) block += 2 * dc * dc * (backward ? 3 : 2);
    at(fl, ops::FlopKind::kIterAdaLN) = L * 2 * block;
  }
  // LM head S×d×V, tied or not; backward dh and dW.
  at(fl, ops::FlopKind::kHead) = (backward ? 2 : 1) * 2 * S * d * V;
  return fl;
}

double sum(const KindFlops& f) {
  double s = 0;
  for (double x : f) s += x;
  return s;
}

BudgetFigures figures_with(const ModelConfig& c, int batch_tokens, double total_params) {
  BudgetFigures b;
  b.total_params = total_params;
  b.active_params_per_token = outer_params(c) + c.n_layers * layer_active_params(c);
  b.param_uses_per_token = outer_params(c) + c.depth() * layer_active_params(c);
  const double fwd = sum(flops_by_kind(c, batch_tokens, false));
  const double bwd = sum(flops_by_kind(c, batch_tokens, true));
  b.flops_per_token_forward = fwd / batch_tokens;
  b.flops_per_token_train = (fwd + bwd) / batch_tokens;
  b.attn_ffn_active_ratio = attention_params(c) / (c.top_k * expert_params(c));
  return b;
}

double rel(double loopmoe, double vanilla) { return vanilla == 0 ? 0 : loopmoe / vanilla - 1; }

double max_matched(const BudgetFigures& v, const BudgetFigures& l) {
  return std::max({std::abs(rel(l.total_params, v.total_params)),
                   std::abs(rel(l.flops_per_token_train, v.flops_per_token_train)),
                   std::abs(rel(l.attn_ffn_active_ratio, v.attn_ffn_active_ratio))});
}

struct Candidate {
  ModelConfig config;
  double max_diff = std::numeric_limits<double>::infinity();
};

// Search order (docs/BUDGET.md): a shape within kSearchTarget beats one outside it; among shapes
// within it, the least compensation (largest head_dim) wins, then the smaller worst difference;
// outside it, the smaller worst difference wins. Remaining ties: larger head_dim, larger cond_dim,
// fewer experts, so the result does not depend on the enumeration order.
bool better(const Candidate& a, const Candidate& b) {
  const bool ia = a.max_diff <= kSearchTarget, ib = b.max_diff <= kSearchTarget;
  if (ia != ib) return ia;
  const ModelConfig &ca = a.config, &cb = b.config;
  if (ia && ca.head_dim != cb.head_dim) return ca.head_dim > cb.head_dim;
  if (a.max_diff != b.max_diff) return a.max_diff < b.max_diff;
  if (ca.head_dim != cb.head_dim) return ca.head_dim > cb.head_dim;
  if (ca.cond_dim != cb.cond_dim) return ca.cond_dim > cb.cond_dim;
  return ca.n_experts < cb.n_experts;
}

constexpr int kMaxExperts = 65536;  // the config's range for n_experts

// Experts (or expert width) counts that bring total params closest to `target` when params are
// `base + per_unit · x`: the floor and ceiling of the exact solution, clamped to [lo, hi].
std::vector<int> nearest_counts(double target, double base, double per_unit, int lo, int hi) {
  const double x = (target - base) / per_unit;
  if (!(x >= lo - 1)) return {};  // even the smallest count overshoots by more than one unit
  std::vector<int> out;
  for (double v : {std::floor(x), std::ceil(x)}) {
    const int n = static_cast<int>(std::clamp(v, static_cast<double>(lo), static_cast<double>(hi)));
    if (out.empty() || out.back() != n) out.push_back(n);
  }
  return out;
}

// The shared shape of every rule: compensated head_dim / expert_hidden, cond_dim, and the expert
// count E' that matches total parameters (docs/BUDGET.md "The search").
ModelConfig solve_shape(const ModelConfig& base, const ModelConfig& vanilla,
                        const BudgetFigures& target, int batch_tokens, int fixed_cond_dim) {
  const int hd0 = vanilla.head_dim, f0 = vanilla.expert_hidden;
  const int hd_min = std::max(2, (hd0 / 2 + 1) / 2 * 2);  // at most halve, keep it even
  std::vector<int> conds;
  if (base.adaln() && fixed_cond_dim > 0) {
    conds.push_back(fixed_cond_dim);
  } else if (base.adaln()) {
    for (int dc = 2; dc <= std::max(2, base.d_model / 2); dc += 2) conds.push_back(dc);
  } else {
    conds.push_back(base.cond_dim);  // unused when IterAdaLN is off
  }
  Candidate best;
  bool found = false;
  for (int hd = hd0; hd >= hd_min; hd -= 2) {
    ModelConfig c = base;
    c.head_dim = hd;
    c.expert_hidden =
        std::max(1, static_cast<int>(std::lround(static_cast<double>(f0) * hd / hd0)));
    for (int dc : conds) {
      c.cond_dim = dc;
      c.n_experts = 0;
      const double per_expert = c.n_layers * (expert_params(c) + c.d_model);
      for (int e : nearest_counts(target.total_params, analytic_total_params(c), per_expert,
                                  c.top_k, kMaxExperts)) {
        Candidate cand;
        cand.config = c;
        cand.config.n_experts = e;
        cand.max_diff = max_matched(
            target, figures_with(cand.config, batch_tokens, analytic_total_params(cand.config)));
        if (!found || better(cand, best)) best = cand;
        found = true;
      }
    }
  }
  if (!found) {
    throw ConfigError(
        "budget: no LoopMoE shape reaches the reference's total parameters with at least top_k "
        "experts (the shared layers and IterAdaLN already exceed it)");
  }
  return best.config;
}

nlohmann::json figures_json(const BudgetFigures& b) {
  return {{"total_params", b.total_params},
          {"active_params_per_token", b.active_params_per_token},
          {"param_uses_per_token", b.param_uses_per_token},
          {"flops_per_token_forward", b.flops_per_token_forward},
          {"flops_per_token_train", b.flops_per_token_train},
          {"attn_ffn_active_ratio", b.attn_ffn_active_ratio}};
}

// 1234567.4 -> "1,234,567".
std::string grouped(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.0f", x);
  std::string s = buf, out;
  const size_t start = (s[0] == '-') ? 1 : 0;
  for (size_t i = 0; i < s.size(); ++i) {
    out += s[i];
    const size_t left = s.size() - 1 - i;
    if (i >= start && left > 0 && left % 3 == 0) out += ',';
  }
  return out;
}

std::string shape_line(const ModelConfig& c) {
  std::ostringstream os;
  os << "N=" << c.n_layers << " x R=" << c.n_loops << ", d=" << c.d_model << ", heads " << c.n_heads
     << " x " << c.head_dim << " (inner " << c.attn_inner() << "), experts " << c.n_experts
     << " top-" << c.top_k << " x hidden " << c.expert_hidden << ", iter_adaln "
     << to_string(c.iter_adaln);
  if (c.adaln()) os << " (cond_dim " << c.cond_dim << ")";
  return os.str();
}

}  // namespace

const char* to_string(Balance balance) {
  switch (balance) {
    case Balance::kExperts:
      return "experts";
    case Balance::kWidth:
      return "width";
    case Balance::kNone:
      return "none";
  }
  return "?";
}

Balance parse_balance(const std::string& name) {
  if (name == "experts") return Balance::kExperts;
  if (name == "width") return Balance::kWidth;
  if (name == "none") return Balance::kNone;
  throw ConfigError("unknown balance rule '" + name + "' (expected experts | width | none)");
}

std::array<double, static_cast<int>(ops::FlopKind::kCount)> forward_flops_by_kind(
    const ModelConfig& config, int batch_tokens) {
  return flops_by_kind(config, batch_tokens, false);
}

std::array<double, static_cast<int>(ops::FlopKind::kCount)> backward_flops_by_kind(
    const ModelConfig& config, int batch_tokens) {
  return flops_by_kind(config, batch_tokens, true);
}

BudgetFigures budget_figures(const ModelConfig& config, int batch_tokens) {
  if (batch_tokens < 1) throw ConfigError("budget: batch_tokens must be positive");
  return figures_with(config, batch_tokens, static_cast<double>(ParamLayout(config).size()));
}

BudgetFigures relative_diff(const BudgetFigures& v, const BudgetFigures& l) {
  BudgetFigures r;
  r.total_params = rel(l.total_params, v.total_params);
  r.active_params_per_token = rel(l.active_params_per_token, v.active_params_per_token);
  r.param_uses_per_token = rel(l.param_uses_per_token, v.param_uses_per_token);
  r.flops_per_token_forward = rel(l.flops_per_token_forward, v.flops_per_token_forward);
  r.flops_per_token_train = rel(l.flops_per_token_train, v.flops_per_token_train);
  r.attn_ffn_active_ratio = rel(l.attn_ffn_active_ratio, v.attn_ffn_active_ratio);
  return r;
}

double max_matched_diff(const SolvedBudget& solved) {
  return max_matched(solved.vanilla, solved.loopmoe);
}

SolvedBudget solve_budget(const ModelConfig& vanilla, int loops, Balance balance,
                          IterAdaLNMode mode, double expert_scale, int batch_tokens, int cond_dim) {
  if (loops < 1) throw ConfigError("budget: --loops must be at least 1");
  if (vanilla.n_loops != 1) {
    throw ConfigError(
        "budget: the reference must be a vanilla config (n_loops = 1), got n_loops = " +
        std::to_string(vanilla.n_loops));
  }
  if (vanilla.n_layers % loops != 0) {
    throw ConfigError("budget: n_layers = " + std::to_string(vanilla.n_layers) +
                      " is not a multiple of loops = " + std::to_string(loops) +
                      " (LoopMoE needs n_layers / loops unique layers)");
  }
  if (!(expert_scale > 0) || !std::isfinite(expert_scale)) {
    throw ConfigError("budget: expert_scale must be positive");
  }
  if (batch_tokens < 1) throw ConfigError("budget: batch_tokens must be positive");
  if (cond_dim != 0) {
    if (mode == IterAdaLNMode::kOff) {
      throw ConfigError("budget: cond_dim is unused with IterAdaLN off; leave it out");
    }
    if (cond_dim < 2 || cond_dim % 2 != 0) {
      throw ConfigError("budget: cond_dim must be even and at least 2, got " +
                        std::to_string(cond_dim));
    }
  }

  SolvedBudget s;
  s.vanilla_config = vanilla;
  s.balance = balance;
  s.expert_scale = expert_scale;
  s.batch_tokens = batch_tokens;
  s.fixed_cond_dim = cond_dim;
  s.vanilla = budget_figures(vanilla, batch_tokens);

  ModelConfig base = vanilla;
  base.n_layers = vanilla.n_layers / loops;
  base.n_loops = loops;
  base.iter_adaln = mode;
  ModelConfig c = solve_shape(base, vanilla, s.vanilla, batch_tokens, cond_dim);
  const double solved_experts = balance == Balance::kExperts ? c.n_experts : vanilla.n_experts;
  c.n_experts = static_cast<int>(
      std::clamp<double>(std::lround(solved_experts * expert_scale), c.top_k, kMaxExperts));
  if (balance == Balance::kWidth) {
    // Freed parameters go into wider experts: solve expert_hidden for total params.
    ModelConfig zero = c;
    zero.expert_hidden = 0;
    const double per_unit = 3.0 * c.n_layers * c.n_experts * c.d_model;
    const std::vector<int> widths =
        nearest_counts(s.vanilla.total_params, analytic_total_params(zero), per_unit, 1, 1000000);
    if (widths.empty()) {
      throw ConfigError("budget: no expert width reaches the reference's total parameters");
    }
    double best = std::numeric_limits<double>::infinity();
    for (int f : widths) {
      zero.expert_hidden = f;
      const double diff = std::abs(rel(analytic_total_params(zero), s.vanilla.total_params));
      if (diff < best) {
        best = diff;
        c.expert_hidden = f;
      }
    }
  }
  s.loopmoe_config = c;
  s.loopmoe = budget_figures(c, batch_tokens);
  if (s.loopmoe.total_params != analytic_total_params(c)) {
    throw std::logic_error("budget: analytic parameter count disagrees with ParamLayout");
  }
  return s;
}

std::string budget_json(const SolvedBudget& solved) {
  nlohmann::json j;
  j["vanilla"] = figures_json(solved.vanilla);
  j["loopmoe"] = figures_json(solved.loopmoe);
  j["relative_diff"] = figures_json(relative_diff(solved.vanilla, solved.loopmoe));
  j["loopmoe_config"] = nlohmann::json::parse(model_to_json(solved.loopmoe_config));
  j["balance"] = to_string(solved.balance);
  j["expert_scale"] = solved.expert_scale;
  j["fixed_cond_dim"] = solved.fixed_cond_dim;  // 0: searched
  return j.dump(2);
}

std::string budget_table(const SolvedBudget& s) {
  const BudgetFigures d = relative_diff(s.vanilla, s.loopmoe);
  struct Row {
    const char* name;
    double v, l, diff;
    bool ratio;
  };
  const Row rows[] = {
      {"total_params", s.vanilla.total_params, s.loopmoe.total_params, d.total_params, false},
      {"active_params_per_token", s.vanilla.active_params_per_token,
       s.loopmoe.active_params_per_token, d.active_params_per_token, false},
      {"param_uses_per_token", s.vanilla.param_uses_per_token, s.loopmoe.param_uses_per_token,
       d.param_uses_per_token, false},
      {"flops_per_token_forward", s.vanilla.flops_per_token_forward,
       s.loopmoe.flops_per_token_forward, d.flops_per_token_forward, false},
      {"flops_per_token_train", s.vanilla.flops_per_token_train, s.loopmoe.flops_per_token_train,
       d.flops_per_token_train, false},
      {"attn_ffn_active_ratio", s.vanilla.attn_ffn_active_ratio, s.loopmoe.attn_ffn_active_ratio,
       d.attn_ffn_active_ratio, true},
  };
  std::ostringstream os;
  char line[160];
  std::snprintf(line, sizeof line, "%-25s %16s %16s %10s\n", "", "Vanilla MoE", "LoopMoE", "diff");
  os << line;
  for (const Row& r : rows) {
    char v[32], l[32];
    if (r.ratio) {
      std::snprintf(v, sizeof v, "%.4f", r.v);
      std::snprintf(l, sizeof l, "%.4f", r.l);
    } else {
      std::snprintf(v, sizeof v, "%s", grouped(r.v).c_str());
      std::snprintf(l, sizeof l, "%s", grouped(r.l).c_str());
    }
    std::snprintf(line, sizeof line, "%-25s %16s %16s %+9.3f%%\n", r.name, v, l, 100 * r.diff);
    os << line;
  }
  os << "\nVanilla MoE: " << shape_line(s.vanilla_config) << "\n";
  os << "LoopMoE:     " << shape_line(s.loopmoe_config) << "\n";
  std::snprintf(line, sizeof line,
                "balance %s, expert_scale %g, %d tokens per batch; largest |diff| of the matched "
                "figures (total params, train FLOPs, ratio): %.3f%%\n",
                to_string(s.balance), s.expert_scale, s.batch_tokens, 100 * max_matched_diff(s));
  os << line;
  if (s.fixed_cond_dim > 0) os << "cond_dim fixed at " << s.fixed_cond_dim << " (not searched)\n";
  return os.str();
}

}  // namespace loopmoe::model
