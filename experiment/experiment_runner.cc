// The experiment runner (experiment.h): every run directory's state machine (skip when done,
// train or resume, audit, evaluate, `done` marker), OUT/experiment.json and sweep.json, and
// run_experiment, which runs the sweep and then the main grid.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <ctime>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "common/atomic_file.h"
#include "common/clock.h"
#include "common/text_file.h"
#include "experiment/experiment.h"
#include "experiment/experiment_internal.h"
#include "model/error.h"
#include "train/format.h"

namespace loopmoe::experiment {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using ojson = nlohmann::ordered_json;
using internal::describe_model;
using internal::print_plan;

// Whole-file replacement (common::write_file_atomically), so an interrupted write never leaves a
// half marker behind.
void write_text_atomic(const fs::path& p, const std::string& text) {
  common::write_file_atomically(p, text, [](const common::WriteFailure& f) {
    if (f.step == common::WriteStep::kCreate) {
      throw std::runtime_error(f.tmp.string() + ": cannot write");
    }
    if (f.step == common::WriteStep::kWrite) {
      throw std::runtime_error(f.tmp.string() + ": write failed");
    }
    throw std::runtime_error(f.message());
  });
}

std::string now_utc() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

// "section.key" of every line that differs between two canonical config texts.
std::string differing_keys(const std::string& a, const std::string& b) {
  auto lines = [](const std::string& text) {
    std::map<std::string, std::string> kv;
    std::istringstream in(text);
    std::string line, section;
    while (std::getline(in, line)) {
      if (line.empty()) continue;
      if (line.front() == '[') {
        section = line.substr(1, line.size() - 2);
        continue;
      }
      const auto eq = line.find(" = ");
      if (eq == std::string::npos) continue;
      kv[section + "." + line.substr(0, eq)] = line.substr(eq + 3);
    }
    return kv;
  };
  const auto ka = lines(a), kb = lines(b);
  std::set<std::string> keys;
  for (const auto& [k, v] : ka) {
    auto it = kb.find(k);
    if (it == kb.end() || it->second != v) keys.insert(k);
  }
  for (const auto& [k, v] : kb) {
    if (!ka.count(k)) keys.insert(k);
  }
  std::string out;
  for (const std::string& k : keys) out += (out.empty() ? "" : ", ") + k;
  return out.empty() ? "(formatting only)" : out;
}

ojson variant_json(const VariantSpec& v, const model::ModelConfig& m) {
  ojson j;
  j["name"] = v.name;
  j["model"] = v.model;
  j["iter_adaln"] = to_string(m.iter_adaln);
  j["balance"] = v.vanilla() ? "-" : to_string(v.balance);
  j["expert_scale"] = v.expert_scale;
  j["steps"] = v.steps;
  j["seeds"] = v.seeds;
  j["n_layers"] = m.n_layers;
  j["n_loops"] = m.n_loops;
  j["n_experts"] = m.n_experts;
  j["expert_hidden"] = m.expert_hidden;
  j["attn_inner"] = m.attn_inner();
  j["cond_dim"] = m.cond_dim;
  return j;
}

// The state machine of one run directory: skip when done, otherwise train (resuming from a
// checkpoint), audit, evaluate, and only then write the `done` marker.
class Runner {
 public:
  Runner(const ExperimentPlan& plan, const ExperimentOptions& options, const ExperimentHooks& hooks,
         std::FILE* log)
      : plan_(plan), opt_(options), hooks_(hooks), log_(log), start_(now()) {
    total_runs_ = static_cast<int>(plan.sweep_runs.size() + plan.runs.size());
    for (const auto* list : {&plan.sweep_runs, &plan.runs}) {
      for (const PlannedRun& r : *list) remaining_steps_ += r.config.train.steps;
    }
  }

  // Whether `run` is to be left for a later invocation: unfinished, and the time limit would not
  // hold it (ExperimentOptions::time_limit). Counts it in summary().remaining.
  bool over_time_limit(const PlannedRun& run) {
    if (opt_.time_limit <= 0 || fs::exists(fs::path(opt_.out_dir) / run.dir / "done")) return false;
    if (summary_.remaining == 0) {
      if (summary_.trained == 0) return false;  // the first run always starts
      const double estimate =
          max_step_seconds_ * run.config.train.steps + (run.sweep ? 0.0 : max_after_seconds_);
      if ((now() - start_) + estimate <= opt_.time_limit) return false;
      std::fprintf(log_, "time limit: %s of %s s spent, the next run (%s) needs about %s s\n",
                   train::format_fixed((now() - start_), 0).c_str(),
                   train::format_fixed(opt_.time_limit, 0).c_str(), run.name.c_str(),
                   train::format_fixed(estimate, 0).c_str());
    }
    ++summary_.remaining;
    return true;
  }

  // Returns the final validation loss (+inf for a diverged sweep run).
  double execute(const PlannedRun& run) {
    ++index_;
    const fs::path dir = fs::path(opt_.out_dir) / run.dir;
    const std::string tag = "[run " + std::to_string(index_) + "/" + std::to_string(total_runs_) +
                            "] " + (run.sweep ? "sweep " : "") + run.name + ": ";
    const std::string want = model::to_toml(run.config);
    remaining_steps_ -= run.config.train.steps;
    if (fs::exists(dir / "done")) {
      const std::string have = common::read_text_if_present(dir / "config.toml").value_or("");
      if (have != want) {
        throw model::ConfigError(
            dir.string() + " was finished with a different config (" + differing_keys(have, want) +
            "): the spec changed; remove that run directory or use another --out");
      }
      ++summary_.skipped;
      const double v = done_val_loss(dir);
      std::fprintf(log_, "%sfinished earlier, skipped (val %s)\n", tag.c_str(),
                   train::format_fixed(v, 4).c_str());
      std::fflush(log_);
      return v;
    }
    const double t0 = now();
    const bool resume = fs::exists(dir / "checkpoint.bin");
    std::fprintf(log_, "%s%s (%d steps, lr %s) ...", tag.c_str(), resume ? "resuming" : "training",
                 run.config.train.steps, format_lr(run.config.train.lr).c_str());
    std::fflush(log_);
    if (opt_.verbose) std::fprintf(log_, "\n");
    train::TrainOptions to;
    to.out_dir = dir.string();
    to.resume = resume;
    to.threads = plan_.spec.threads;
    to.progress = opt_.verbose;
    bool diverged = false;
    std::string divergence;
    try {
      hooks_.train(run.config, to);
    } catch (const std::exception& e) {
      // A sweep candidate that diverges is a result (that lr is too large), not a failure.
      // The trainer's numerics guard (train.nonfinite = "stop") says "loss became ..." or
      // "gradient norm became ...", whichever went non-finite first.
      const std::string what = e.what();
      if (run.sweep && (what.find("loss became") != std::string::npos ||
                        what.find("gradient norm became") != std::string::npos)) {
        diverged = true;
        divergence = e.what();
      } else {
        fail(run, "training", e);
      }
    }
    double val = diverged ? INFINITY : final_val_loss(dir.string());
    const double train_seconds = (now() - t0);
    max_step_seconds_ = std::max(max_step_seconds_, train_seconds / run.config.train.steps);
    if (!run.sweep) {
      std::fprintf(log_, " audit ...");
      std::fflush(log_);
      eval::AuditOptions ao;
      ao.batches = plan_.spec.audit_batches;
      ao.threads = plan_.spec.threads;
      try {
        hooks_.audit(dir.string(), ao);
      } catch (const std::exception& e) {
        fail(run, "audit", e);
      }
      std::fprintf(log_, " eval ...");
      std::fflush(log_);
      eval::EvalOptions eo;
      const model::ModelConfig& m = run.config.model;
      if (m.n_loops > 1) {
        // Inference at other loop counts and adaptive halting only mean something for a looped
        // model; the vanilla model appears in those plots as its plain validation loss.
        for (int k : plan_.spec.eval_loops) {
          if (k != m.n_loops) eo.loops.push_back(k);
        }
        eo.halt_thresholds = plan_.spec.halt_thresholds;
      }
      eo.batches = plan_.spec.eval_batches;
      eo.max_items = plan_.spec.eval_items;
      eo.threads = plan_.spec.threads;
      eo.progress = opt_.verbose;
      try {
        hooks_.eval(dir.string(), eo);
      } catch (const std::exception& e) {
        fail(run, "evaluation", e);
      }
    }
    const double seconds = (now() - t0);
    if (!run.sweep) max_after_seconds_ = std::max(max_after_seconds_, seconds - train_seconds);
    ojson done;
    done["run"] = run.name;
    done["val_loss"] = std::isfinite(val) ? ojson(val) : ojson(nullptr);
    done["diverged"] = diverged;
    if (diverged) done["message"] = divergence;
    done["seconds"] = seconds;
    done["finished"] = now_utc();
    fs::create_directories(dir);
    write_text_atomic(dir / "done", done.dump(2) + "\n");
    ++summary_.trained;
    steps_trained_ += run.config.train.steps;
    const double elapsed = (now() - start_);
    const double eta = elapsed / std::max(1, steps_trained_) * remaining_steps_;
    std::fprintf(log_, " %s (%s, ETA %s)\n",
                 diverged ? "diverged" : ("val " + train::format_fixed(val, 4)).c_str(),
                 train::format_seconds(seconds).c_str(), train::format_seconds(eta).c_str());
    std::fflush(log_);
    return val;
  }

  ExperimentSummary summary() const { return summary_; }

 private:
  double now() const { return hooks_.now_seconds ? hooks_.now_seconds() : steady_seconds(); }
  static double steady_seconds() {
    return std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
  }
  [[noreturn]] void fail(const PlannedRun& run, const char* phase, const std::exception& e) {
    std::fprintf(log_, " failed\n");
    std::fflush(log_);
    throw std::runtime_error(
        "run " + run.name + " (" + (fs::path(opt_.out_dir) / run.dir).string() + ") failed in " +
        phase + ": " + e.what() +
        "\nfix the cause and rerun the same command: finished runs are skipped and this one " +
        "resumes from its last checkpoint");
  }
  static double done_val_loss(const fs::path& dir) {
    try {
      const auto j = nlohmann::json::parse(common::read_text_if_present(dir / "done").value_or(""));
      if (j.value("diverged", false)) return INFINITY;
      if (j.contains("val_loss") && j["val_loss"].is_number()) return j["val_loss"].get<double>();
    } catch (const nlohmann::json::exception&) {
      // An old or hand-written marker: fall back to the metrics.
    }
    return final_val_loss(dir.string());
  }

  const ExperimentPlan& plan_;
  const ExperimentOptions& opt_;
  const ExperimentHooks& hooks_;
  std::FILE* log_;
  double start_;  // now() when the invocation began
  int index_ = 0, total_runs_ = 0, steps_trained_ = 0;
  double max_step_seconds_ = 0;   // the slowest training seconds per step seen so far
  double max_after_seconds_ = 0;  // the slowest audit + eval of a main run seen so far
  long remaining_steps_ = 0;
  ExperimentSummary summary_;
};

std::string git_output(const char* command) {
  std::string out;
  if (std::FILE* p = popen(command, "r")) {
    char buf[256];
    while (std::fgets(buf, sizeof buf, p) != nullptr) out += buf;
    if (pclose(p) != 0) return "";
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

void write_experiment_json(const ExperimentPlan& plan, const ExperimentOptions& opt,
                           const std::map<std::string, double>& lrs) {
  const ExperimentSpec& s = plan.spec;
  ojson j;
  j["name"] = s.name;
  j["spec_file"] = s.source;
  j["command"] = opt.command;
  j["revision"] = source_revision();
  j["written"] = now_utc();
  j["base_config"] = s.base_config;
  j["data_dir"] = plan.base.data.dir;
  j["loops"] = s.loops;
  j["steps"] = s.steps;
  j["seeds"] = s.seeds;
  j["lr_sweep"] = s.lr_sweep;
  j["sweep_steps"] = s.sweep_steps;
  j["sweep_seed"] = s.sweep_seed;
  j["threads"] = s.threads;
  j["device"] = opt.device;
  j["batch_tokens"] = plan.base.train.batch_size * plan.base.model.seq_len;
  ojson lr = ojson::object();
  for (const auto& [family, value] : lrs) lr[family] = value;
  j["learning_rates"] = lr;
  j["variants"] = ojson::array();
  for (const VariantSpec& v : s.variants) {
    ojson vj = variant_json(v, plan.models.at(v.name));
    auto it = lrs.find(v.model);
    vj["lr"] = it == lrs.end() ? ojson(nullptr) : ojson(it->second);
    j["variants"].push_back(vj);
  }
  j["runs"] = ojson::array();
  for (const PlannedRun& r : plan.runs) {
    j["runs"].push_back(
        {{"name", r.name}, {"variant", r.variant}, {"seed", r.seed}, {"dir", r.dir}});
  }
  write_text_atomic(fs::path(opt.out_dir) / "experiment.json", j.dump(2) + "\n");
}

ExperimentSummary stopped_by_time_limit(const ExperimentSpec& spec, const ExperimentOptions& opt,
                                        const ExperimentSummary& summary, std::FILE* log) {
  std::fprintf(log,
               "\nexperiment %s stopped at the time limit (%s s): %d runs trained now, %d finished "
               "earlier, %d left; rerun the same command to continue\n",
               spec.name.c_str(), train::format_fixed(opt.time_limit, 0).c_str(), summary.trained,
               summary.skipped, summary.remaining);
  return summary;
}

}  // namespace

double final_val_loss(const std::string& run_dir) {
  return train::recorded_validation_loss(run_dir);
}

std::string source_revision() {
  const std::string head = git_output("git rev-parse HEAD 2>/dev/null");
  if (head.empty()) return "";
  const std::string dirty = git_output("git status --porcelain --untracked-files=no 2>/dev/null");
  return dirty.empty() ? head : head + " (with uncommitted changes)";
}

ExperimentSummary run_experiment(const ExperimentSpec& spec, const ExperimentOptions& opt,
                                 const ExperimentHooks& hooks, std::FILE* log) {
  ExperimentPlan plan = plan_experiment(spec, hooks);
  if (opt.dry_run) {
    print_plan(plan, hooks, /*measure=*/true, log);
    return {};
  }
  print_plan(plan, hooks, /*measure=*/false, log);
  std::fprintf(log, "output: %s\n\n", opt.out_dir.c_str());
  const fs::path train_bin = fs::path(plan.base.data.dir) / "train.bin";
  if (!fs::exists(train_bin)) {
    // Fail before the first run rather than after the sweep.
    throw model::ConfigError(train_bin.string() + ": no dataset (prepare it with `loopmoe data " +
                             "prepare`, or set experiment.data_dir)");
  }
  const fs::path out(opt.out_dir);
  fs::create_directories(out);
  write_text_atomic(out / "spec.toml", spec.text);
  if (!plan.budget_json.empty()) write_text_atomic(out / "budget.json", plan.budget_json + "\n");
  write_experiment_json(plan, opt, {});

  Runner runner(plan, opt, hooks, log);
  std::map<std::string, double> lrs;
  if (plan.sweep_runs.empty()) {
    const double lr = spec.lr_sweep.empty() ? plan.base.train.lr : spec.lr_sweep[0];
    for (const auto& [family, m] : plan.family_reference) lrs[family] = lr;
  } else {
    std::vector<SweepPoint> points;
    ojson table = ojson::array();
    for (const PlannedRun& r : plan.sweep_runs) {
      if (runner.over_time_limit(r)) continue;
      const double v = runner.execute(r);
      points.push_back({r.family, r.config.train.lr, v});
      table.push_back({{"family", r.family},
                       {"lr", r.config.train.lr},
                       {"val_loss", std::isfinite(v) ? ojson(v) : ojson(nullptr)},
                       {"diverged", std::isinf(v)},
                       {"run", r.dir}});
    }
    if (runner.summary().remaining > 0) {
      // The main runs need every sweep point; the next invocation finishes the sweep first.
      for (const PlannedRun& r : plan.runs) runner.over_time_limit(r);
      return stopped_by_time_limit(spec, opt, runner.summary(), log);
    }
    lrs = choose_learning_rates(points);
    ojson sweep;
    sweep["steps"] = spec.sweep_steps;
    sweep["seed"] = spec.sweep_seed;
    sweep["candidates"] = spec.lr_sweep;
    ojson refs = ojson::object();
    for (const auto& [family, m] : plan.family_reference) refs[family] = describe_model(m);
    sweep["reference_models"] = refs;
    sweep["points"] = table;
    ojson chosen = ojson::object();
    for (const auto& [family, lr] : lrs) chosen[family] = lr;
    sweep["chosen"] = chosen;
    write_text_atomic(out / "sweep.json", sweep.dump(2) + "\n");
    for (const auto& [family, lr] : lrs) {
      std::fprintf(log, "learning rate for %s: %s\n", family.c_str(), format_lr(lr).c_str());
    }
  }
  apply_learning_rates(plan, lrs);
  write_experiment_json(plan, opt, lrs);
  for (const PlannedRun& r : plan.runs) {
    if (!runner.over_time_limit(r)) runner.execute(r);
  }
  if (runner.summary().remaining > 0)
    return stopped_by_time_limit(spec, opt, runner.summary(), log);
  ExperimentSummary summary = runner.summary();
  summary.learning_rates = lrs;
  std::fprintf(log, "\nexperiment %s done: %d runs trained now, %d finished earlier\n",
               spec.name.c_str(), summary.trained, summary.skipped);
  std::fprintf(log, "report: loopmoe report --runs %s\n", opt.out_dir.c_str());
  return summary;
}

}  // namespace loopmoe::experiment
