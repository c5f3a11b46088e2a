#include "experiment/report.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "experiment/experiment.h"
#include "model/budget.h"
#include "model/config.h"
#include "model/error.h"
#include "train/format.h"

extern char** environ;

namespace loopmoe {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ojson = nlohmann::ordered_json;

// Plot files the script writes; removed before each run so a stale plot is never shown.
const std::vector<std::pair<std::string, std::string>> kPlots = {
    {"val_loss.png", "Training and validation loss (mean per variant, seeds faint)"},
    {"routing_heatmap.png", "Expert load per layer × iteration (share of routed token slots)"},
    {"logit_lens.png", "Loss per iteration (logit lens)"},
    {"loop_sweep.png", "Loss vs inference loop count, and adaptive halting"},
    {"lr_sweep.png", "Learning-rate sweep"},
};

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) return "";
  return std::string(std::istreambuf_iterator<char>(in), {});
}

double num(const json& j, const char* key) {
  if (!j.is_object()) return NAN;
  auto it = j.find(key);
  if (it == j.end() || !it->is_number()) return NAN;
  return it->get<double>();
}

const json& sub(const json& j, const char* key) {
  static const json null_json;
  if (!j.is_object()) return null_json;
  auto it = j.find(key);
  return it == j.end() ? null_json : *it;
}

std::string percent_diff(double x, double ref) {
  if (!std::isfinite(x) || !std::isfinite(ref) || ref == 0) return "n/a";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%+.2f%%", 100.0 * (x - ref) / ref);
  return buf;
}

struct RunData {
  std::string name, variant;
  fs::path dir;
  uint64_t seed = 0;
  bool done = false;
  Config config;
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

json read_json(const fs::path& p, std::vector<std::string>& notes) {
  if (!fs::exists(p)) return json();
  try {
    return json::parse(read_text(p));
  } catch (const json::exception& e) {
    notes.push_back("`" + p.string() + "` is not valid JSON (" + e.what() + "); ignored.");
    return json();
  }
}

void read_metrics(RunData& r) {
  std::ifstream in(r.dir / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception&) {
      continue;  // a torn last line of an interrupted run
    }
    const double step = num(j, "step");
    if (!std::isfinite(step)) continue;
    const double val = num(j, "val_loss");
    const double loss = num(j, "loss");
    if (std::isfinite(val)) r.val_curve.emplace_back(static_cast<int>(step), val);
    if (std::isfinite(loss)) r.train_curve.emplace_back(static_cast<int>(step), loss);
  }
}

// "<variant>_s<seed>"; names without the suffix are a variant of their own.
std::pair<std::string, uint64_t> split_run_name(const std::string& name) {
  const auto pos = name.rfind("_s");
  if (pos != std::string::npos && pos + 2 < name.size() &&
      std::all_of(name.begin() + static_cast<long>(pos) + 2, name.end(),
                  [](char c) { return std::isdigit(static_cast<unsigned char>(c)); })) {
    return {name.substr(0, pos), std::stoull(name.substr(pos + 2))};
  }
  return {name, 0};
}

Gathered gather(const fs::path& root) {
  Gathered g;
  g.root = root;
  g.runs_root = fs::is_directory(root / "runs") ? root / "runs" : root;
  g.experiment = read_json(root / "experiment.json", g.notes);
  g.sweep = read_json(root / "sweep.json", g.notes);
  g.budget = read_json(root / "budget.json", g.notes);
  g.spec_text = read_text(root / "spec.toml");

  std::map<std::string, std::pair<std::string, uint64_t>> planned;  // run -> (variant, seed)
  for (const json& r : sub(g.experiment, "runs")) {
    if (r.contains("name") && r.contains("variant") && r.contains("seed")) {
      planned[r["name"].get<std::string>()] = {r["variant"].get<std::string>(),
                                               r["seed"].get<uint64_t>()};
    }
  }
  std::map<std::string, VariantData> by_name;
  std::vector<std::string> order;
  for (const json& v : sub(g.experiment, "variants")) {
    VariantData d;
    d.name = v.value("name", "");
    d.model = v.value("model", "");
    d.iter_adaln = v.value("iter_adaln", "");
    d.balance = v.value("balance", "?");
    d.expert_scale = num(v, "expert_scale");
    d.lr = num(v, "lr");
    order.push_back(d.name);
    by_name[d.name] = d;
  }

  std::vector<fs::path> dirs;
  if (fs::is_directory(g.runs_root)) {
    for (const auto& e : fs::directory_iterator(g.runs_root)) {
      if (e.is_directory() && fs::exists(e.path() / "config.toml")) dirs.push_back(e.path());
    }
  }
  std::sort(dirs.begin(), dirs.end());
  for (const fs::path& dir : dirs) {
    RunData r;
    r.dir = dir;
    r.name = dir.filename().string();
    auto it = planned.find(r.name);
    std::tie(r.variant, r.seed) = it != planned.end() ? it->second : split_run_name(r.name);
    r.done = fs::exists(dir / "done");
    if (!r.done) {
      g.incomplete.push_back(r.name);
      continue;
    }
    try {
      r.config = load_config((dir / "config.toml").string());
    } catch (const std::exception& e) {
      g.notes.push_back(std::string("run ") + r.name + " skipped: " + e.what());
      continue;
    }
    read_metrics(r);
    r.audit = read_json(dir / "audit.json", g.notes);
    r.eval = read_json(dir / "eval.json", g.notes);
    r.seconds = num(read_json(dir / "done", g.notes), "seconds");
    r.val_loss = num(r.eval, "val_loss");
    if (!std::isfinite(r.val_loss) && !r.val_curve.empty()) r.val_loss = r.val_curve.back().second;
    if (!by_name.count(r.variant)) {
      // No experiment.json (a hand-made directory of runs): describe the variant from its config.
      VariantData d;
      d.name = r.variant;
      const ModelConfig& m = r.config.model;
      d.model = (m.n_loops > 1 || m.adaln()) ? kLoopMoEFamily : kVanillaFamily;
      d.iter_adaln = to_string(m.iter_adaln);
      d.lr = r.config.train.lr;
      by_name[d.name] = d;
    }
    by_name[r.variant].runs.push_back(std::move(r));
  }
  // Spec order when known; otherwise vanilla first, then by name.
  std::vector<std::string> rest;
  for (const auto& [name, d] : by_name) {
    if (std::find(order.begin(), order.end(), name) == order.end()) rest.push_back(name);
  }
  std::stable_sort(rest.begin(), rest.end(), [&](const std::string& a, const std::string& b) {
    return (by_name[a].model == kVanillaFamily) > (by_name[b].model == kVanillaFamily);
  });
  order.insert(order.end(), rest.begin(), rest.end());
  for (const std::string& name : order) {
    VariantData& d = by_name[name];
    std::sort(d.runs.begin(), d.runs.end(),
              [](const RunData& a, const RunData& b) { return a.seed < b.seed; });
    g.variants.push_back(std::move(d));
  }
  return g;
}

std::vector<double> collect(const VariantData& v, const std::function<double(const RunData&)>& f) {
  std::vector<double> out;
  for (const RunData& r : v.runs) out.push_back(f(r));
  return out;
}

// The LoopMoE variant the paper proposes (joint IterAdaLN, experts balancing, solved count).
const VariantData* reference_loopmoe(const Gathered& g) {
  const VariantData* fallback = nullptr;
  for (const VariantData& v : g.variants) {
    if (v.model != kLoopMoEFamily || v.runs.empty() || v.iter_adaln != "joint") continue;
    if ((v.balance == "experts" || v.balance == "?") &&
        (!std::isfinite(v.expert_scale) || v.expert_scale == 1.0)) {
      return &v;
    }
    if (fallback == nullptr) fallback = &v;
  }
  return fallback;
}

const VariantData* first_vanilla(const Gathered& g) {
  for (const VariantData& v : g.variants) {
    if (v.model == kVanillaFamily && !v.runs.empty()) return &v;
  }
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// report_data.json: everything the plot script needs, already per run.

ojson pairs(const std::vector<std::pair<int, double>>& xs) {
  ojson a = ojson::array();
  for (const auto& [s, v] : xs) a.push_back({s, v});
  return a;
}

ojson plot_data(const Gathered& g) {
  ojson d;
  d["name"] = g.experiment.is_object() ? g.experiment.value("name", "") : "";
  d["variants"] = ojson::array();
  for (const VariantData& v : g.variants) {
    if (v.runs.empty()) continue;
    ojson vj;
    vj["name"] = v.name;
    vj["model"] = v.model;
    vj["n_loops"] = v.runs.front().config.model.n_loops;
    vj["runs"] = ojson::array();
    for (const RunData& r : v.runs) {
      ojson rj;
      rj["name"] = r.name;
      rj["seed"] = r.seed;
      rj["val_loss"] = std::isfinite(r.val_loss) ? ojson(r.val_loss) : ojson(nullptr);
      rj["val_curve"] = pairs(r.val_curve);
      rj["train_curve"] = pairs(r.train_curve);
      ojson lens = ojson::array();
      for (const json& e : sub(r.eval, "logit_lens")) {
        if (std::isfinite(num(e, "iteration")) && std::isfinite(num(e, "loss"))) {
          lens.push_back({num(e, "iteration"), num(e, "loss")});
        }
      }
      rj["logit_lens"] = lens;
      // The trained loop count is the run's own validation loss; add it when the sweep left it
      // out, so the curve passes through the trained point.
      std::map<double, double> sweep;
      for (const json& e : sub(r.eval, "loop_sweep")) {
        if (std::isfinite(num(e, "loops")) && std::isfinite(num(e, "loss"))) {
          sweep[num(e, "loops")] = num(e, "loss");
        }
      }
      const double trained = r.config.model.n_loops;
      if (!sweep.count(trained) && std::isfinite(r.val_loss)) sweep[trained] = r.val_loss;
      ojson sw = ojson::array();
      for (const auto& [k, l] : sweep) sw.push_back({k, l});
      rj["loop_sweep"] = sw;
      ojson ad = ojson::array();
      for (const json& e : sub(r.eval, "adaptive")) {
        if (std::isfinite(num(e, "loss")) && std::isfinite(num(e, "avg_iterations"))) {
          ad.push_back({num(e, "threshold"), num(e, "loss"), num(e, "avg_iterations")});
        }
      }
      rj["adaptive"] = ad;
      vj["runs"].push_back(rj);
    }
    d["variants"].push_back(vj);
  }
  // Heatmaps: the first seed of vanilla and of the reference LoopMoE.
  d["heatmaps"] = ojson::array();
  for (const VariantData* v : {first_vanilla(g), reference_loopmoe(g)}) {
    if (v == nullptr) continue;
    const RunData& r = v->runs.front();
    ojson rows = ojson::array();
    for (const json& e : sub(r.audit, "routing")) {
      if (!e.contains("tokens_per_expert")) continue;
      rows.push_back({{"layer", num(e, "layer")},
                      {"iteration", num(e, "iteration")},
                      {"tokens_per_expert", e["tokens_per_expert"]}});
    }
    if (rows.empty()) continue;
    d["heatmaps"].push_back({{"variant", v->name},
                             {"run", r.name},
                             {"n_experts", r.config.model.n_experts},
                             {"rows", rows}});
  }
  d["sweep"] = g.sweep.is_null() ? ojson(nullptr) : ojson::parse(g.sweep.dump());
  return d;
}

// ---------------------------------------------------------------------------------------------
// Plotting

// Runs `python script data plots_dir` without a shell (paths may hold anything), output to a log.
std::string run_plot_script(const std::string& python, const std::string& script,
                            const fs::path& data, const fs::path& plots_dir) {
  if (!fs::exists(python)) return python + " not found";
  if (script.empty() || !fs::exists(script)) {
    return "plot script not found (" + (script.empty() ? "scripts/plot_report.py" : script) +
           "; pass --plot-script)";
  }
  const fs::path log = plots_dir / "plot_log.txt";
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  std::vector<std::string> args = {python, script, data.string(), plots_dir.string()};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, python.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) return "cannot start " + python + ": " + std::strerror(rc);
  int status = 0;
  if (waitpid(pid, &status, 0) < 0) return "waitpid failed";
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return "";
  // The last lines of the script's output say why (e.g. no matplotlib).
  std::istringstream in(read_text(log));
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  std::string tail;
  for (size_t i = lines.size() > 3 ? lines.size() - 3 : 0; i < lines.size(); ++i) {
    tail += (tail.empty() ? "" : " | ") + lines[i];
  }
  return "the plot script failed (" + log.string() + "): " + tail;
}

// ---------------------------------------------------------------------------------------------
// Markdown

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

std::string code(const std::string& s) { return "`" + s + "`"; }

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
          "; wall time of the finished runs " + format_seconds(seconds));
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
  BudgetFigures ref;
  bool have_ref = false;
  std::vector<std::vector<std::string>> rows;
  std::vector<std::pair<const VariantData*, BudgetFigures>> figs;
  for (const VariantData& v : g.variants) {
    if (v.runs.empty()) continue;
    const Config& c = v.runs.front().config;
    BudgetFigures f;
    f.total_params = NAN;
    f.active_params_per_token = NAN;
    f.param_uses_per_token = NAN;
    f.flops_per_token_forward = NAN;
    f.flops_per_token_train = NAN;
    f.attn_ffn_active_ratio = NAN;
    try {
      f = budget_figures(c.model, c.train.batch_size * c.model.seq_len);
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
    const ModelConfig& m = v->runs.front().config.model;
    rows.push_back({v->name,
                    std::to_string(m.n_layers) + "×" + std::to_string(m.n_loops) + ", E " +
                        std::to_string(m.n_experts) + ", f " + std::to_string(m.expert_hidden),
                    format_si(f.total_params, 4), d(f.total_params, ref.total_params),
                    format_si(f.active_params_per_token, 4),
                    format_si(f.flops_per_token_forward, 4),
                    d(f.flops_per_token_forward, ref.flops_per_token_forward),
                    format_si(f.flops_per_token_train, 4), format_fixed(f.attn_ffn_active_ratio, 4),
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
    mrows.push_back({v.name, format_si(num(f, "measured"), 4), format_si(num(f, "analytic"), 4),
                     rel_s, format_fixed(num(a, "attn_ffn_flop_ratio"), 4),
                     format_si(num(a, "tokens"), 4)});
    const json& by = sub(f, "by_kind");
    double total = 0;
    for (const std::string& k : kinds)
      total += std::isfinite(num(by, k.c_str())) ? num(by, k.c_str()) : 0;
    std::vector<std::string> kr = {v.name};
    for (const std::string& k : kinds) {
      const double x = num(by, k.c_str());
      kr.push_back(std::isfinite(x) && total > 0
                       ? format_si(x, 4) + " (" + format_fixed(100 * x / total, 1) + "%)"
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
        cell = p.value("diverged", false) ? "diverged" : format_fixed(num(p, "val_loss"), 4);
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
    rows.push_back({v.name, format_mean_std(mean_std(overload), 3), format_fixed(worst, 3),
                    format_mean_std(mean_std(dropped), 0), format_mean_std(mean_std(distinct), 2),
                    format_fixed(possible, 0)});
  }
  md.table({"variant", "overload (max/mean)", "worst", "dropped tokens", "distinct experts",
            "max possible"},
           rows);
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

}  // namespace

MeanStd mean_std(const std::vector<double>& values) {
  MeanStd m;
  double sum = 0;
  for (double x : values) {
    if (!std::isfinite(x)) continue;
    sum += x;
    ++m.n;
  }
  if (m.n == 0) {
    m.mean = NAN;
    m.std = NAN;
    return m;
  }
  m.mean = sum / m.n;
  if (m.n < 2) {
    m.std = NAN;
    return m;
  }
  double ss = 0;
  for (double x : values) {
    if (std::isfinite(x)) ss += (x - m.mean) * (x - m.mean);
  }
  m.std = std::sqrt(ss / (m.n - 1));
  return m;
}

std::string format_mean_std(const MeanStd& m, int precision, double scale) {
  if (m.n == 0) return "n/a";
  std::string s = format_fixed(m.mean * scale, precision);
  if (m.n >= 2) s += " ± " + format_fixed(m.std * scale, precision);
  return s;
}

std::string find_plot_script() {
  const fs::path rel = fs::path("scripts") / "plot_report.py";
  if (fs::exists(rel)) return fs::absolute(rel).string();
  std::error_code ec;
  fs::path dir = fs::read_symlink("/proc/self/exe", ec).parent_path();
  // build/loopmoe → the repository two levels up; build/tests/loopmoe_tests → three.
  for (int up = 0; !ec && up < 3 && !dir.empty(); ++up, dir = dir.parent_path()) {
    if (fs::exists(dir / rel)) return (dir / rel).string();
    if (dir == dir.parent_path()) break;
  }
  return "";
}

ReportResult write_report(const ReportOptions& opt) {
  const fs::path root(opt.runs_dir);
  if (!fs::is_directory(root)) throw ConfigError(opt.runs_dir + ": no such directory");
  Gathered g = gather(root);
  int finished = 0;
  for (const VariantData& v : g.variants) finished += static_cast<int>(v.runs.size());
  if (finished == 0) {
    throw ConfigError(opt.runs_dir + ": no finished runs (run directories with a `done` marker, " +
                      "under runs/ or directly inside)");
  }
  ReportResult result;
  const fs::path out_file = opt.out_file.empty() ? root / "report.md" : fs::path(opt.out_file);
  const fs::path out_dir = out_file.parent_path().empty() ? fs::path(".") : out_file.parent_path();
  const fs::path plots_dir = opt.plots_dir.empty() ? out_dir / "plots" : fs::path(opt.plots_dir);
  fs::create_directories(out_dir);
  result.report_path = out_file.string();
  const fs::path data_path = out_dir / "report_data.json";
  result.data_path = data_path.string();
  {
    std::ofstream out(data_path, std::ios::trunc);
    out << plot_data(g).dump(1) << "\n";
    if (!out) throw std::runtime_error(data_path.string() + ": cannot write");
  }

  if (opt.plots) {
    fs::create_directories(plots_dir);
    for (const auto& [file, title] : kPlots) fs::remove(plots_dir / file);
    const std::string script = opt.plot_script.empty() ? find_plot_script() : opt.plot_script;
    result.plot_note = run_plot_script(opt.python, script, data_path, plots_dir);
  } else {
    result.plot_note = "plots disabled (--no-plots)";
  }

  Markdown md;
  std::string name = g.experiment.is_object() ? g.experiment.value("name", "") : "";
  md.line("# LoopMoE experiment report" + (name.empty() ? "" : ": " + name));
  md.line();
  {
    const std::time_t t = std::time(nullptr);
    std::tm tm{};
    gmtime_r(&t, &tm);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M UTC", &tm);
    md.line(std::string("Written ") + buf +
            " by `loopmoe report`. Vanilla MoE against LoopMoE at "
            "matched parameters, FLOPs per token and attention:FFN ratio (docs/EXPERIMENTS.md).");
  }
  md.line();
  section_what(md, g, opt);
  section_budget(md, g);
  section_sweep(md, g);
  section_results(md, g);
  section_routing(md, g);
  section_loops(md, g);

  md.line("## Plots");
  md.line();
  const fs::path rel_plots = plots_dir.lexically_proximate(out_dir);
  for (const auto& [file, title] : kPlots) {
    if (!fs::exists(plots_dir / file)) continue;
    result.plots.push_back((plots_dir / file).string());
    md.line("### " + title);
    md.line();
    md.line("![" + title + "](" + (rel_plots / file).generic_string() + ")");
    md.line();
  }
  if (!result.plot_note.empty()) {
    md.line("> **Plots were not drawn**: " + result.plot_note +
            ". The tables above are "
            "complete; rerun `loopmoe report` once plotting works.");
    md.line();
  } else if (result.plots.empty()) {
    md.line("No plot had data to show.");
    md.line();
  }
  if (!g.notes.empty()) {
    md.line("## Notes");
    md.line();
    for (const std::string& n : g.notes) md.line("- " + n);
    md.line();
  }
  const fs::path tmp = out_file.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << md.str();
    if (!out) throw std::runtime_error(tmp.string() + ": cannot write");
  }
  fs::rename(tmp, out_file);
  return result;
}

}  // namespace loopmoe
