// Experiment grids (docs/EXPERIMENTS.md): a spec names a Vanilla MoE base config and variants
// (model × IterAdaLN mode × balancing rule × expert scale); the runner sweeps the learning rate
// for both model families with equal effort, then trains every variant × seed one after another,
// audits and evaluates it, and can be interrupted and rerun at any point without losing work.
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "eval/audit.h"
#include "eval/evaluator.h"
#include "model/budget.h"
#include "model/config.h"
#include "train/trainer.h"

namespace loopmoe::experiment {

// The two model families; each gets its own learning rate from the same sweep.
inline constexpr const char* kVanillaFamily = "vanilla";
inline constexpr const char* kLoopMoEFamily = "loopmoe";

struct VariantSpec {
  std::string name;
  std::string model = kLoopMoEFamily;  // "vanilla" | "loopmoe" (also the LR family)
  model::IterAdaLNMode iter_adaln = model::IterAdaLNMode::kJoint;
  model::Balance balance = model::Balance::kExperts;
  double expert_scale = 1.0;
  int steps = 0;                // per run; the parser fills in experiment.steps when not given
  std::vector<uint64_t> seeds;  // the parser fills in experiment.seeds when not given

  bool vanilla() const { return model == kVanillaFamily; }
};

struct ExperimentSpec {
  std::string source;  // path of the spec file (error messages, report)
  std::string text;    // verbatim spec text (copied into OUT/spec.toml)
  std::string name = "experiment";
  std::string base_config;  // resolved path of the Vanilla MoE config
  int loops = 4;
  int steps = 300;
  std::vector<uint64_t> seeds = {1, 2, 3};
  std::vector<double> lr_sweep;  // empty: no sweep, both families use the base config's lr
  int sweep_steps = 150;
  uint64_t sweep_seed = 1;
  int threads = 2;
  int eval_batches = 16;
  int audit_batches = 4;
  int eval_items = 400;
  std::vector<int> eval_loops = {1, 2, 3, 6, 8};
  std::vector<double> halt_thresholds = {0.005, 0.01, 0.02, 0.05, 0.1};
  int eval_interval = 0;  // 0: steps / 10
  int checkpoint_interval = 100;
  std::string data_dir;  // empty: the base config's data.dir
  std::vector<VariantSpec> variants;
};

// Parses a spec. Relative base_config paths are looked up next to the spec file first, then in
// the working directory. Unknown keys, wrong types and bad values throw ConfigError naming the
// source and the key.
ExperimentSpec parse_experiment_spec(const std::string& toml_text, const std::string& source);
ExperimentSpec load_experiment_spec(const std::string& path);
// "experiment.key" and "variant.key" of every spec key (held against docs/EXPERIMENTS.md).
std::vector<std::string> experiment_spec_keys();

struct StepTiming {
  double step = 0;     // forward + backward of one training batch
  double forward = 0;  // forward only (validation, audit, evaluation)
};

// Replaceable steps of the runner, so tests can count calls without training anything.
struct ExperimentHooks {
  std::function<model::SolvedBudget(const model::ModelConfig& vanilla, int loops,
                                    model::Balance balance, model::IterAdaLNMode mode,
                                    double expert_scale)>
      solve;
  std::function<void(const model::Config& config, const train::TrainOptions& options)> train;
  std::function<void(const std::string& run_dir, const eval::AuditOptions& options)> audit;
  std::function<void(const std::string& run_dir, const eval::EvalOptions& options)> eval;
  // Seconds per training step and per forward-only batch of a config (dry-run time estimate);
  // measured by default.
  std::function<StepTiming(const model::Config& config, int threads)> step_seconds;
  // Monotonic seconds for durations, the ETA and the time limit; empty: the steady clock.
  std::function<double()> now_seconds;
  // Analytic figures for the plan printout; may throw (then shown as n/a).
  std::function<model::BudgetFigures(const model::ModelConfig& config, int batch_tokens)> figures;
};
ExperimentHooks default_experiment_hooks();

struct PlannedRun {
  std::string name;     // "loop_joint_s2", "vanilla_lr0.003"
  std::string dir;      // relative to OUT: "runs/loop_joint_s2", "sweep/vanilla_lr0.003"
  std::string variant;  // variant name; the family for sweep runs
  std::string family;   // kVanillaFamily | kLoopMoEFamily
  bool sweep = false;
  uint64_t seed = 0;
  model::Config config;  // complete, except train.lr of main runs before the sweep has chosen
};

struct ExperimentPlan {
  ExperimentSpec spec;
  model::Config base;                                // base config with the spec's data_dir
  std::map<std::string, model::ModelConfig> models;  // per variant
  std::map<std::string, model::ModelConfig> family_reference;  // model the sweep trains per family
  std::string budget_json;  // solver output for the LoopMoE reference
  std::vector<PlannedRun> sweep_runs, runs;
};

// Builds every run's config; throws ConfigError when the base or a solved config is invalid.
ExperimentPlan plan_experiment(const ExperimentSpec& spec, const ExperimentHooks& hooks);

struct SweepPoint {
  std::string family;
  double lr = 0;
  double val_loss = 0;  // +inf when the run diverged
};
// Per family, the lr with the lowest final validation loss (ties: the earlier point).
std::map<std::string, double> choose_learning_rates(const std::vector<SweepPoint>& points);

// Applies the chosen learning rates to the main runs (throws if a family has none).
void apply_learning_rates(ExperimentPlan& plan, const std::map<std::string, double>& lrs);

struct ExperimentOptions {
  std::string out_dir = "experiments/default";
  bool dry_run = false;
  bool verbose = false;        // the trainer's own progress lines
  std::string command;         // recorded in OUT/experiment.json
  std::string device = "cpu";  // recorded; the caller selects it (model::use_device) beforehand
  // Seconds this invocation may take (0: no limit). A run is not started when the time spent plus
  // its estimate (the slowest seconds per step seen in this invocation times its steps, plus the
  // slowest audit + eval) would pass the limit; the first run is always started. Whole runs only:
  // a GPU slot brings back finished runs (their `done` markers), never a half-trained one.
  double time_limit = 0;
};

struct ExperimentSummary {
  int trained = 0;    // runs trained (or resumed) in this invocation
  int skipped = 0;    // runs found finished
  int remaining = 0;  // runs left unstarted by the time limit (0: the grid is complete)
  std::map<std::string, double> learning_rates;
};

// Runs (or, with dry_run, prints) the plan. Progress goes to `log`. A failing run stops the grid
// with an error naming it; finished runs stay finished.
ExperimentSummary run_experiment(const ExperimentSpec& spec, const ExperimentOptions& options,
                                 const ExperimentHooks& hooks = default_experiment_hooks(),
                                 std::FILE* log = stderr);

// Last {"step", "val_loss"} record of RUN/metrics.jsonl; NaN when there is none
// (recorded_validation_loss, train/trainer.h).
double final_val_loss(const std::string& run_dir);
// The learning rate as used in run names: "0.003", "0.0015".
std::string format_lr(double lr);
// `git rev-parse HEAD` of the working directory, "+ (with uncommitted changes)" when the tree is
// dirty; empty outside a git checkout.
std::string source_revision();

}  // namespace loopmoe::experiment
