// The report's Markdown sections (report_internal.h): what was run, budget (analytic and
// measured), learning-rate sweep, results, routing, and the per-iteration tables.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>

#include "experiment/experiment.h"
#include "experiment/report_internal.h"
#include "model/budget.h"
#include "model/config.h"
#include "train/format.h"

namespace loopmoe::experiment::report_internal {
namespace {

std::string percent_diff(double x, double ref) {
  if (!std::isfinite(x) || !std::isfinite(ref) || ref == 0) return "n/a";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%+.2f%%", 100.0 * (x - ref) / ref);
  return buf;
}

// Mean over seeds of per-run curves keyed by x, as a table: one row per variant.
void curve_table(Markdown& md, const Gathered& g, const char* title, const char* key,
                 const char* x_key, const char* x_label, bool looped_only) {
  std::map<double, int> xs;
  std::vector<std::pair<std::string, std::map<double, std::vector<double>>>> data;
  for (const VariantData& v : g.variants) {
    if (v.runs.empty()) continue;
    if (looped_only && v.runs.front().config.model.n_loops <= 1) continue;
    std::map<double, std::vector<double>> per_x;
    for (const RunData& r : v.runs) {
      for (const json& e : sub(r.eval, key)) {
        const double x = num(e, x_key), l = num(e, "loss");
        if (!std::isfinite(x)) continue;
        per_x[x].push_back(l);
        xs[x] = 1;
      }
    }
    if (!per_x.empty()) data.emplace_back(v.name, per_x);
  }
  if (data.empty()) return;
  md.line(std::string("### ") + title);
  md.line();
  std::vector<std::string> header = {"variant"};
  for (const auto& [x, unused] : xs) header.push_back(std::string(x_label) + format_lr(x));
  std::vector<std::vector<std::string>> rows;
  for (const auto& [name, per_x] : data) {
    std::vector<std::string> r = {name};
    for (const auto& [x, unused] : xs) {
      auto it = per_x.find(x);
      r.push_back(it == per_x.end() ? "" : format_mean_std(mean_std(it->second), 3));
    }
    rows.push_back(r);
  }
  md.table(header, rows);
}

// Held-out perplexity per domain of the dataset (eval.json "domains", present when the dataset
// holds several): one row per domain, in the order the evals list them, one column per variant.
void domain_table(Markdown& md, const Gathered& g) {
  std::vector<std::string> domains;  // first-seen order
  std::vector<std::pair<std::string, std::map<std::string, std::vector<double>>>> data;
  for (const VariantData& v : g.variants) {
    std::map<std::string, std::vector<double>> per_domain;
    for (const RunData& r : v.runs) {
      for (const json& d : sub(r.eval, "domains")) {
        const json& name = sub(d, "name");
        if (!name.is_string()) continue;
        const std::string n = name.get<std::string>();
        if (std::find(domains.begin(), domains.end(), n) == domains.end()) domains.push_back(n);
        const double p = num(d, "perplexity");
        if (std::isfinite(p)) per_domain[n].push_back(p);
      }
    }
    if (!per_domain.empty()) data.emplace_back(v.name, per_domain);
  }
  if (data.empty()) return;
  md.line("### Perplexity per domain");
  md.line();
  md.line(
      "Held-out perplexity over validation windows inside each domain's text (`eval.json` "
      "`domains`, docs/EVAL.md), mean ± sample std over seeds.");
  md.line();
  std::vector<std::string> header = {"domain"};
  for (const auto& [variant, unused] : data) header.push_back(variant);
  std::vector<std::vector<std::string>> rows;
  for (const std::string& d : domains) {
    std::vector<std::string> r = {code(d)};
    for (const auto& [variant, per_domain] : data) {
      const auto it = per_domain.find(d);
      r.push_back(it == per_domain.end() ? "" : format_mean_std(mean_std(it->second), 2));
    }
    rows.push_back(r);
  }
  md.table(header, rows);
}

}  // namespace

void section_what(Markdown& md, const Gathered& g, const ReportOptions& opt) {
  const json& e = g.experiment;
  md.line("## What was run");
  md.line();
  if (e.is_object()) {
    md.line("- Spec: " + code(e.value("spec_file", "?")) + " (verbatim below)");
    md.line("- Command: " + code(e.value("command", "?")));
    const std::string rev = e.value("revision", "");
    md.line("- Source revision: " +
            (rev.empty() ? std::string("unknown (not a git checkout)") : code(rev)));
    md.line("- Base config: " + code(e.value("base_config", "?")) + ", data " +
            code(e.value("data_dir", "?")) + ", " + std::to_string(e.value("batch_tokens", 0)) +
            " tokens per step, " + std::to_string(e.value("threads", 0)) + " threads");
    std::string seeds;
    for (const json& s : sub(e, "seeds")) seeds += (seeds.empty() ? "" : ", ") + s.dump();
    md.line("- Grid: " + std::to_string(sub(e, "variants").size()) + " variants × seeds [" + seeds +
            "], " + std::to_string(e.value("steps", 0)) +
            " steps per run, LoopMoE loops R = " + std::to_string(e.value("loops", 0)));
  } else {
    const std::string rev = source_revision();
    md.line("- Runs: " + code(g.runs_root.string()) + " (no experiment.json: variants inferred " +
            "from run names `<variant>_s<seed>` and their configs)");
    md.line("- Source revision at report time: " + (rev.empty() ? "unknown" : code(rev)));
  }
  int done = 0;
  double seconds = 0;
  for (const VariantData& v : g.variants) {
    done += static_cast<int>(v.runs.size());
    for (const RunData& r : v.runs) seconds += std::isfinite(r.seconds) ? r.seconds : 0;
  }
  md.line("- Finished runs: " + std::to_string(done) +
          (g.incomplete.empty() ? "" : ", incomplete: " + std::to_string(g.incomplete.size())) +
          "; wall time of the finished runs " + train::format_seconds(seconds));
  md.line("- Report: `loopmoe report --runs " + opt.runs_dir + "`");
  if (!g.incomplete.empty()) {
    std::string list;
    for (const std::string& n : g.incomplete) list += (list.empty() ? "" : ", ") + code(n);
    md.line("- Not finished (excluded below): " + list);
  }
  md.line();
  if (!g.spec_text.empty()) {
    md.line("<details><summary>Experiment spec</summary>");
    md.line();
    md.line("```toml");
    std::string text = g.spec_text;
    while (!text.empty() && text.back() == '\n') text.pop_back();
    md.line(text);
    md.line("```");
    md.line("</details>");
    md.line();
  }
}

void section_budget(Markdown& md, const Gathered& g) {
  md.line("## Budget: parameters, FLOPs, attention:FFN ratio");
  md.line();
  md.line(
      "Analytic figures come from the budget solver's counting (`model/budget.h`) applied to "
      "each variant's trained config; the measured columns are the FLOPs the kernels "
      "executed during the audit (`audit.json` of the first finished seed). Δ is relative "
      "to the vanilla model.");
  md.line();
  const VariantData* van = first_vanilla(g);
  model::BudgetFigures ref;
  bool have_ref = false;
  std::vector<std::vector<std::string>> rows;
  std::vector<std::pair<const VariantData*, model::BudgetFigures>> figs;
  for (const VariantData& v : g.variants) {
    if (v.runs.empty()) continue;
    const model::Config& c = v.runs.front().config;
    model::BudgetFigures f;
    f.total_params = NAN;
    f.active_params_per_token = NAN;
    f.param_uses_per_token = NAN;
    f.flops_per_token_forward = NAN;
    f.flops_per_token_train = NAN;
    f.attn_ffn_active_ratio = NAN;
    try {
      f = model::budget_figures(c.model, c.train.batch_size * c.model.seq_len);
    } catch (const std::exception&) {
      // Solver not available in this build: the measured table still stands.
    }
    if (&v == van) {
      ref = f;
      have_ref = true;
    }
    figs.emplace_back(&v, f);
  }
  auto d = [&](double x, double r) { return have_ref ? percent_diff(x, r) : std::string("n/a"); };
  for (const auto& [v, f] : figs) {
    const model::ModelConfig& m = v->runs.front().config.model;
    rows.push_back({v->name,
                    std::to_string(m.n_layers) + "×" + std::to_string(m.n_loops) + ", E " +
                        std::to_string(m.n_experts) + ", f " + std::to_string(m.expert_hidden),
                    train::format_si(f.total_params, 4), d(f.total_params, ref.total_params),
                    train::format_si(f.active_params_per_token, 4),
                    train::format_si(f.flops_per_token_forward, 4),
                    d(f.flops_per_token_forward, ref.flops_per_token_forward),
                    train::format_si(f.flops_per_token_train, 4),
                    train::format_fixed(f.attn_ffn_active_ratio, 4),
                    d(f.attn_ffn_active_ratio, ref.attn_ffn_active_ratio)});
  }
  md.line("### Analytic");
  md.line();
  md.table({"variant", "layers×loops, experts, width", "params", "Δ", "active params/token",
            "FLOPs/token (fwd)", "Δ", "FLOPs/token (train)", "attn:FFN active", "Δ"},
           rows, 2);
  if (g.budget.is_object()) {
    md.line("The solver's own output for the reference pair is in `budget.json`.");
    const json& rd = sub(g.budget, "relative_diff");
    if (rd.is_object() && !rd.empty()) {
      std::vector<std::vector<std::string>> r2;
      for (auto it = rd.begin(); it != rd.end(); ++it) {
        if (it->is_number()) {
          char buf[32];
          std::snprintf(buf, sizeof buf, "%+.3f%%", 100.0 * it->get<double>());
          r2.push_back({code(it.key()), buf});
        }
      }
      md.line();
      md.table({"solver: LoopMoE vs vanilla", "relative difference"}, r2);
    } else {
      md.line();
    }
  }
  md.line("### Measured (audit)");
  md.line();
  std::vector<std::vector<std::string>> mrows, krows;
  const std::vector<std::string> kinds = {"attention_proj", "attention_scores", "router",
                                          "experts",        "iter_adaln",       "head"};
  for (const VariantData& v : g.variants) {
    if (v.runs.empty()) continue;
    const json& a = v.runs.front().audit;
    if (a.is_null()) {
      mrows.push_back({v.name, "no audit.json", "", "", "", ""});
      continue;
    }
    const json& f = sub(a, "flops_per_token");
    const double rel = num(f, "relative_diff");
    char rel_s[32] = "n/a";
    if (std::isfinite(rel)) std::snprintf(rel_s, sizeof rel_s, "%+.4f%%", 100.0 * rel);
    mrows.push_back({v.name, train::format_si(num(f, "measured"), 4),
                     train::format_si(num(f, "analytic"), 4), rel_s,
                     train::format_fixed(num(a, "attn_ffn_flop_ratio"), 4),
                     train::format_si(num(a, "tokens"), 4)});
    const json& by = sub(f, "by_kind");
    double total = 0;
    for (const std::string& k : kinds)
      total += std::isfinite(num(by, k.c_str())) ? num(by, k.c_str()) : 0;
    std::vector<std::string> kr = {v.name};
    for (const std::string& k : kinds) {
      const double x = num(by, k.c_str());
      kr.push_back(std::isfinite(x) && total > 0
                       ? train::format_si(x, 4) + " (" + train::format_fixed(100 * x / total, 1) +
                             "%)"
                       : "n/a");
    }
    krows.push_back(kr);
  }
  md.table({"variant", "FLOPs/token measured", "analytic", "relative diff", "attn:FFN FLOP ratio",
            "audited tokens"},
           mrows);
  if (!krows.empty()) {
    md.line("Measured forward FLOPs per token by kind (share of the total):");
    md.line();
    std::vector<std::string> header = {"variant"};
    header.insert(header.end(), kinds.begin(), kinds.end());
    md.table(header, krows);
  }
}

void section_sweep(Markdown& md, const Gathered& g) {
  md.line("## Learning-rate sweep (equal tuning effort)");
  md.line();
  const json& s = g.sweep;
  if (!s.is_object()) {
    std::string lrs;
    for (const VariantData& v : g.variants) {
      if (!v.runs.empty()) lrs += (lrs.empty() ? "" : ", ") + v.name + " " + format_lr(v.lr);
    }
    md.line("No sweep was run (one candidate, or no `sweep.json`); learning rates: " + lrs + ".");
    md.line();
    return;
  }
  md.line("Both families trained the same candidate learning rates for " +
          std::to_string(s.value("steps", 0)) + " steps at seed " +
          std::to_string(s.value("seed", 0)) +
          " on their reference model; each family then uses the candidate with the lowest final "
          "validation loss for all of its variants (bold).");
  md.line();
  std::vector<std::string> families;
  for (const json& p : sub(s, "points")) {
    const std::string f = p.value("family", "");
    if (std::find(families.begin(), families.end(), f) == families.end()) families.push_back(f);
  }
  std::vector<double> lrs;
  for (const json& c : sub(s, "candidates")) lrs.push_back(c.get<double>());
  std::vector<std::vector<std::string>> rows;
  for (double lr : lrs) {
    std::vector<std::string> r = {format_lr(lr)};
    for (const std::string& f : families) {
      std::string cell = "n/a";
      for (const json& p : sub(s, "points")) {
        if (p.value("family", "") != f || num(p, "lr") != lr) continue;
        cell = p.value("diverged", false) ? "diverged" : train::format_fixed(num(p, "val_loss"), 4);
        if (num(sub(s, "chosen"), f.c_str()) == lr) cell = "**" + cell + "**";
      }
      r.push_back(cell);
    }
    rows.push_back(r);
  }
  std::vector<std::string> header = {"lr"};
  for (const std::string& f : families) {
    const json& ref = sub(sub(s, "reference_models"), f.c_str());
    header.push_back(f + (ref.is_string() ? " (" + ref.get<std::string>() + ")" : ""));
  }
  md.table(header, rows);
}

void section_results(Markdown& md, const Gathered& g) {
  md.line("## Results (mean ± sample std over seeds)");
  md.line();
  md.line(
      "Validation loss and perplexity from `eval.json` (held-out tokens; the training's "
      "final validation loss if there is none); accuracies in percent.");
  md.line();
  std::vector<std::vector<std::string>> rows;
  for (const VariantData& v : g.variants) {
    if (v.runs.empty()) continue;
    auto ms = [&](const std::function<double(const RunData&)>& f) {
      return mean_std(collect(v, f));
    };
    const MeanStd val = ms([](const RunData& r) { return r.val_loss; });
    const MeanStd ppl = ms([](const RunData& r) {
      const double p = num(r.eval, "perplexity");
      return std::isfinite(p) ? p : std::exp(r.val_loss);
    });
    const MeanStd cloze =
        ms([](const RunData& r) { return num(sub(r.eval, "cloze"), "accuracy"); });
    const MeanStd cloze_loss =
        ms([](const RunData& r) { return num(sub(r.eval, "cloze"), "target_loss"); });
    const MeanStd mc =
        ms([](const RunData& r) { return num(sub(r.eval, "multiple_choice"), "accuracy"); });
    const MeanStd mcn =
        ms([](const RunData& r) { return num(sub(r.eval, "multiple_choice"), "accuracy_norm"); });
    std::string desc = v.model;
    if (v.model == kLoopMoEFamily) {
      desc += " " + v.iter_adaln + ", " + v.balance;
      if (std::isfinite(v.expert_scale) && v.expert_scale != 1.0) {
        desc += " ×" + format_lr(v.expert_scale);
      }
    }
    rows.push_back({v.name, desc, std::to_string(val.n), format_mean_std(val, 4),
                    format_mean_std(ppl, 2), format_mean_std(cloze, 1, 100.0),
                    format_mean_std(cloze_loss, 3), format_mean_std(mc, 1, 100.0),
                    format_mean_std(mcn, 1, 100.0), format_lr(v.lr)});
  }
  md.table({"variant", "model", "n", "val loss", "perplexity", "cloze acc", "cloze target loss",
            "MC acc", "MC acc (norm)", "lr"},
           rows, 2);
  domain_table(md, g);
}

void section_routing(Markdown& md, const Gathered& g) {
  md.line("## Routing (audit, mean ± std over seeds)");
  md.line();
  md.line(
      "Overload is max/mean tokens per expert of one (layer, iteration), averaged over all of "
      "them; worst is the largest over layers, iterations and seeds. Distinct experts: how "
      "many different experts a token visits at a layer across the R iterations (mean over "
      "layers), against the most possible, min(E, k·R).");
  md.line();
  std::vector<std::vector<std::string>> rows;
  for (const VariantData& v : g.variants) {
    if (v.runs.empty()) continue;
    std::vector<double> overload, dropped, distinct;
    double worst = NAN, possible = NAN;
    for (const RunData& r : v.runs) {
      std::vector<double> o;
      for (const json& e : sub(r.audit, "routing")) {
        const double x = num(e, "overload");
        if (!std::isfinite(x)) continue;
        o.push_back(x);
        worst = std::isfinite(worst) ? std::max(worst, x) : x;
      }
      overload.push_back(o.empty() ? NAN : mean_std(o).mean);
      dropped.push_back(num(r.audit, "dropped"));
      std::vector<double> dm;
      for (const json& e : sub(r.audit, "distinct_experts")) {
        dm.push_back(num(e, "mean"));
        possible = num(e, "max_possible");
      }
      distinct.push_back(dm.empty() ? NAN : mean_std(dm).mean);
    }
    rows.push_back({v.name, format_mean_std(mean_std(overload), 3), train::format_fixed(worst, 3),
                    format_mean_std(mean_std(dropped), 0), format_mean_std(mean_std(distinct), 2),
                    train::format_fixed(possible, 0)});
  }
  md.table({"variant", "overload (max/mean)", "worst", "dropped tokens", "distinct experts",
            "max possible"},
           rows);
}

void section_loops(Markdown& md, const Gathered& g) {
  md.line("## Iterations");
  md.line();
  md.line(
      "Mean ± std over seeds of the validation loss when decoding the residual stream after "
      "each iteration (logit lens), when running the trained model with another loop count, "
      "and with per-token adaptive halting.");
  md.line();
  curve_table(md, g, "Loss per iteration (logit lens)", "logit_lens", "iteration", "r=", true);
  curve_table(md, g, "Loss vs inference loop count", "loop_sweep", "loops", "R=", true);
  std::vector<std::vector<std::string>> rows;
  for (const VariantData& v : g.variants) {
    std::map<double, std::pair<std::vector<double>, std::vector<double>>> per_t;
    for (const RunData& r : v.runs) {
      for (const json& e : sub(r.eval, "adaptive")) {
        per_t[num(e, "threshold")].first.push_back(num(e, "loss"));
        per_t[num(e, "threshold")].second.push_back(num(e, "avg_iterations"));
      }
    }
    for (const auto& [t, la] : per_t) {
      rows.push_back({v.name, format_lr(t), format_mean_std(mean_std(la.first), 3),
                      format_mean_std(mean_std(la.second), 2)});
    }
  }
  if (!rows.empty()) {
    md.line("### Adaptive halting");
    md.line();
    md.table({"variant", "threshold", "loss", "avg iterations"}, rows);
  }
}

}  // namespace loopmoe::experiment::report_internal
