// The report's data (report_internal.h): every run directory gathered (config, metrics, audit,
// eval, done marker), variants in spec order, and report_data.json for the plot script.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "common/text_file.h"
#include "experiment/experiment.h"
#include "experiment/report_internal.h"
#include "model/config.h"

namespace loopmoe::experiment::report_internal {
namespace {

json read_json(const fs::path& p, std::vector<std::string>& notes) {
  if (!fs::exists(p)) return json();
  try {
    return json::parse(common::read_text_if_present(p).value_or(""));
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

ojson pairs(const std::vector<std::pair<int, double>>& xs) {
  ojson a = ojson::array();
  for (const auto& [s, v] : xs) a.push_back({s, v});
  return a;
}

}  // namespace

Gathered gather(const fs::path& root) {
  Gathered g;
  g.root = root;
  g.runs_root = fs::is_directory(root / "runs") ? root / "runs" : root;
  g.experiment = read_json(root / "experiment.json", g.notes);
  g.sweep = read_json(root / "sweep.json", g.notes);
  g.budget = read_json(root / "budget.json", g.notes);
  g.spec_text = common::read_text_if_present(root / "spec.toml").value_or("");

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
      r.config = model::load_config((dir / "config.toml").string());
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
      const model::ModelConfig& m = r.config.model;
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

}  // namespace loopmoe::experiment::report_internal
