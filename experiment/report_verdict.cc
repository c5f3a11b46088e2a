// The report's "Scale and verdict" section (report_internal.h): how much each variant was trained
// (tokens per run, per parameter) and whether the Vanilla MoE vs LoopMoE difference in validation
// loss exceeds the spread over seeds.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "experiment/report_internal.h"
#include "model/budget.h"

namespace loopmoe::experiment::report_internal {
namespace {

std::string millions(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f M", x / 1e6);
  return buf;
}

std::string fixed(double x, int precision) {
  if (!std::isfinite(x)) return "n/a";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", precision, x);
  return buf;
}

}  // namespace

Verdict compare_to_seed_spread(const MeanStd& vanilla, const MeanStd& loopmoe) {
  Verdict v;
  v.difference = loopmoe.mean - vanilla.mean;
  if (vanilla.n < 2 || loopmoe.n < 2) return v;  // no spread to compare with
  v.spread = vanilla.std + loopmoe.std;
  v.comparable = true;
  v.exceeds = std::fabs(v.difference) > v.spread;
  const double se =
      std::sqrt(vanilla.std * vanilla.std / vanilla.n + loopmoe.std * loopmoe.std / loopmoe.n);
  v.welch_t = se > 0 ? v.difference / se : NAN;
  return v;
}

void section_scale(Markdown& md, const Gathered& g) {
  md.line("## Scale and verdict");
  md.line();
  md.line(
      "Tokens per run are steps × batch × sequence length of the run's config; parameters are "
      "the analytic counts of `loopmoe budget` (total, and active: what one token's forward "
      "touches).");
  md.line();
  std::vector<std::vector<std::string>> rows;
  for (const VariantData& v : g.variants) {
    if (v.runs.empty()) continue;
    const model::Config& c = v.runs.front().config;
    const double tokens = static_cast<double>(c.train.steps) * c.train.batch_size * c.model.seq_len;
    double total = NAN, active = NAN;
    try {
      const model::BudgetFigures f =
          model::budget_figures(c.model, c.train.batch_size * c.model.seq_len);
      total = f.total_params;
      active = f.active_params_per_token;
    } catch (const std::exception&) {
      // An unsolvable or hand-edited config: the counts stay n/a.
    }
    rows.push_back({v.name, std::to_string(v.runs.size()), std::to_string(c.train.steps),
                    millions(tokens), millions(total), millions(active), fixed(tokens / total, 2),
                    fixed(tokens / active, 2)});
  }
  md.table({"variant", "runs", "steps", "tokens per run", "parameters", "active per token",
            "tokens / parameter", "tokens / active parameter"},
           rows, 1);
  md.line();

  const VariantData* vanilla = first_vanilla(g);
  const VariantData* loop = reference_loopmoe(g);
  if (vanilla == nullptr || loop == nullptr || vanilla->runs.empty() || loop->runs.empty()) {
    md.line("No verdict: the grid lacks a finished Vanilla MoE or reference LoopMoE run.");
    md.line();
    return;
  }
  const auto val = [](const RunData& r) { return r.val_loss; };
  const MeanStd mv = mean_std(collect(*vanilla, val));
  const MeanStd ml = mean_std(collect(*loop, val));
  const Verdict v = compare_to_seed_spread(mv, ml);
  const std::string who = "`" + loop->name + "` − `" + vanilla->name + "`";
  md.line("**Vanilla MoE vs LoopMoE.** Validation loss " + who + " = " + fixed(v.difference, 4) +
          " nats (" + format_mean_std(ml, 4) + " against " + format_mean_std(mv, 4) + ").");
  if (!v.comparable) {
    md.line(
        "With fewer than two seeds on a side there is no seed spread to compare the difference "
        "with: no verdict.");
  } else {
    md.line(std::string("The difference ") + (v.exceeds ? "**exceeds**" : "**does not exceed**") +
            " the seed spread (the sum of the two sample standard deviations, " +
            fixed(v.spread, 4) + "); Welch's t = " + fixed(v.welch_t, 2) + " with " +
            std::to_string(mv.n) + " and " + std::to_string(ml.n) + " seeds. " +
            (v.exceeds ? (v.difference < 0 ? "LoopMoE is better at this scale."
                                           : "Vanilla MoE is better at this scale.")
                       : "At this scale the seeds cannot tell the two apart."));
  }
  md.line();
}

}  // namespace loopmoe::experiment::report_internal
