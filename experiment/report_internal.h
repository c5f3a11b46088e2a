// Private to experiment/: the report's gathered data and what its files share. report_data.cc
// gathers the runs and builds report_data.json, report_sections.cc writes the Markdown sections,
// report_plots.cc runs the plot script, report.cc puts the report together.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "experiment/report.h"
#include "model/config.h"

namespace loopmoe::experiment::report_internal {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ojson = nlohmann::ordered_json;

// j[key] as a number; NaN when j is not an object or the key is missing or not a number.
inline double num(const json& j, const char* key) {
  if (!j.is_object()) return NAN;
  auto it = j.find(key);
  if (it == j.end() || !it->is_number()) return NAN;
  return it->get<double>();
}

// j[key]; null when j is not an object or the key is missing.
inline const json& sub(const json& j, const char* key) {
  static const json null_json;
  if (!j.is_object()) return null_json;
  auto it = j.find(key);
  return it == j.end() ? null_json : *it;
}

struct RunData {
  std::string name, variant;
  fs::path dir;
  uint64_t seed = 0;
  bool done = false;
  model::Config config;
  std::vector<std::pair<int, double>> val_curve, train_curve;
  json audit, eval;  // null when missing
  double seconds = NAN;
  double val_loss = NAN;  // eval.json, else the training's final validation
};

struct VariantData {
  std::string name, model, iter_adaln, balance = "?";
  double expert_scale = NAN, lr = NAN;
  std::vector<RunData> runs;  // finished runs, by seed
};

struct Gathered {
  fs::path root, runs_root;
  json experiment, sweep, budget;  // null when missing
  std::string spec_text;
  std::vector<VariantData> variants;
  std::vector<std::string> incomplete, notes;
};

// ---------------------------------------------------------------------------------------------
// report_data.cc

// Every run under `root` (runs/ when present): finished runs by variant, in spec order.
Gathered gather(const fs::path& root);
std::vector<double> collect(const VariantData& v, const std::function<double(const RunData&)>& f);
// The LoopMoE variant the paper proposes (joint IterAdaLN, experts balancing, solved count).
const VariantData* reference_loopmoe(const Gathered& g);
const VariantData* first_vanilla(const Gathered& g);
// report_data.json: everything the plot script needs, already per run.
ojson plot_data(const Gathered& g);

// ---------------------------------------------------------------------------------------------
// report_plots.cc

// Runs `python script data plots_dir` without a shell (paths may hold anything), output to
// plots_dir/plot_log.txt. Returns "" on success, else why there are no plots.
std::string run_plot_script(const std::string& python, const std::string& script,
                            const fs::path& data, const fs::path& plots_dir);

// ---------------------------------------------------------------------------------------------
// report_sections.cc

class Markdown {
 public:
  void line(const std::string& s = "") { os_ << s << "\n"; }
  // The first `text_columns` columns hold names (left-aligned); the rest hold numbers.
  void table(const std::vector<std::string>& header,
             const std::vector<std::vector<std::string>>& rows, size_t text_columns = 1) {
    row(header);
    std::string sep = "|";
    for (size_t i = 0; i < header.size(); ++i) sep += i < text_columns ? "---|" : "---:|";
    line(sep);
    for (const auto& r : rows) row(r);
    line();
  }
  std::string str() const { return os_.str(); }

 private:
  void row(const std::vector<std::string>& cells) {
    std::string s = "|";
    for (const std::string& c : cells) s += " " + c + " |";
    line(s);
  }
  std::ostringstream os_;
};

inline std::string code(const std::string& s) { return "`" + s + "`"; }

void section_what(Markdown& md, const Gathered& g, const ReportOptions& opt);
void section_budget(Markdown& md, const Gathered& g);
void section_sweep(Markdown& md, const Gathered& g);
void section_results(Markdown& md, const Gathered& g);

// report_verdict.cc
// Whether LoopMoE's mean validation loss differs from Vanilla MoE's by more than the seeds
// spread: |difference| > sum of the two sample standard deviations (needs 2 seeds a side).
struct Verdict {
  double difference = NAN;  // loopmoe.mean - vanilla.mean (negative: LoopMoE better)
  double spread = NAN;      // vanilla.std + loopmoe.std
  double welch_t = NAN;     // difference / sqrt(s_v^2 / n_v + s_l^2 / n_l)
  bool comparable = false;  // both sides have at least two seeds
  bool exceeds = false;
};
Verdict compare_to_seed_spread(const MeanStd& vanilla, const MeanStd& loopmoe);
// Tokens per run and per parameter of each variant, then the Vanilla vs LoopMoE verdict.
void section_scale(Markdown& md, const Gathered& g);
void section_routing(Markdown& md, const Gathered& g);
void section_loops(Markdown& md, const Gathered& g);

}  // namespace loopmoe::experiment::report_internal
