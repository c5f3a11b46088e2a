// Experiment planning (experiment.h): the default hooks, every run's config (learning-rate sweep
// and main grid), the choice of learning rates, and the plan printout with its time estimate.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <sstream>

#include "common/clock.h"
#include "experiment/experiment.h"
#include "experiment/experiment_internal.h"
#include "model/error.h"
#include "model/model.h"
#include "train/format.h"

namespace loopmoe::experiment {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// Wall time of one optimizer-free training step (forward + backward) and of one forward pass on
// random tokens: enough for a plan's time estimate without touching the dataset.
StepTiming measure_step_seconds(const model::Config& cfg, int threads) {
  model::set_num_threads(threads);
  const int B = cfg.train.batch_size, T = cfg.model.seq_len;
  model::Model model(cfg.model);
  model.set_grad_groups(cfg.train.grad_groups);
  model.init_params(1);
  std::vector<int32_t> in(static_cast<size_t>(B) * T), tg(in.size());
  uint64_t s = 88172645463325252ull;
  for (size_t i = 0; i < in.size(); ++i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    in[i] = static_cast<int32_t>(s % static_cast<uint64_t>(cfg.model.vocab_size));
    tg[i] = static_cast<int32_t>((s >> 20) % static_cast<uint64_t>(cfg.model.vocab_size));
  }
  auto seconds = [](auto&& f, int reps) {
    const auto t0 = Clock::now();
    for (int i = 0; i < reps; ++i) f();
    return common::seconds_since(t0) / reps;
  };
  auto step = [&] {
    model.zero_grad();
    model.forward(in.data(), tg.data(), B, T);
    model.backward();
  };
  step();  // warm-up: first-touch allocation
  StepTiming t;
  t.step = seconds(step, 3);
  t.forward = seconds([&] { model.forward(in.data(), tg.data(), B, T); }, 3);
  return t;
}

model::Config run_config(const ExperimentPlan& plan, const model::ModelConfig& model, int steps,
                         uint64_t seed, double lr, bool sweep) {
  const ExperimentSpec& spec = plan.spec;
  model::Config c = plan.base;
  c.model = model;
  c.train.steps = steps;
  c.train.seed = seed;
  c.train.lr = lr;
  // Same warmup for every run of a length; a short run keeps at least 80% of its steps after it.
  c.train.warmup_steps = std::min(plan.base.train.warmup_steps, steps / 5);
  // The sweep only needs the final validation loss; main runs get ~10 points for the curves.
  c.train.eval_interval =
      sweep ? 0 : (spec.eval_interval > 0 ? spec.eval_interval : std::max(1, steps / 10));
  c.train.checkpoint_interval = spec.checkpoint_interval;
  c.train.log_interval = std::min(plan.base.train.log_interval, std::max(1, steps / 20));
  return c;
}

}  // namespace

namespace internal {

std::string describe_model(const model::ModelConfig& m) {
  std::ostringstream os;
  os << m.n_layers << "x" << m.n_loops << " E" << m.n_experts << " k" << m.top_k << " f"
     << m.expert_hidden << " inner" << m.attn_inner() << " " << to_string(m.iter_adaln);
  if (m.adaln()) os << " dc" << m.cond_dim;
  return os.str();
}

void print_plan(const ExperimentPlan& plan, const ExperimentHooks& hooks, bool measure,
                std::FILE* out) {
  const ExperimentSpec& s = plan.spec;
  const int batch_tokens = plan.base.train.batch_size * plan.base.model.seq_len;
  std::fprintf(out, "experiment %s (%s)\n", s.name.c_str(), s.source.c_str());
  std::fprintf(out, "base config %s, loops R=%d, data %s, %d threads, %d tokens per step\n",
               s.base_config.c_str(), s.loops, plan.base.data.dir.c_str(), s.threads, batch_tokens);
  std::fprintf(out, "\n%-18s %-8s %-40s %9s %10s %9s\n", "variant", "family", "model", "params",
               "FLOPs/tok", "attn:ffn");
  std::map<std::string, double> step_s;  // per variant / family
  auto row = [&](const std::string& name, const std::string& family, const model::ModelConfig& m) {
    double params = NAN, flops = NAN, ratio = NAN;
    try {
      const model::BudgetFigures f = hooks.figures(m, batch_tokens);
      params = f.total_params;
      flops = f.flops_per_token_forward;
      ratio = f.attn_ffn_active_ratio;
    } catch (const std::exception&) {
      // Budget figures unavailable: the plan is still worth printing.
    }
    std::fprintf(out, "%-18s %-8s %-40s %9s %10s %9s\n", name.c_str(), family.c_str(),
                 describe_model(m).c_str(), train::format_si(params, 3).c_str(),
                 train::format_si(flops, 3).c_str(), train::format_fixed(ratio, 3).c_str());
  };
  for (const VariantSpec& v : s.variants) row(v.name, v.model, plan.models.at(v.name));
  if (s.lr_sweep.size() > 1) {
    std::fprintf(out,
                 "\nlearning-rate sweep (equal effort): %zu candidates x %zu families, "
                 "%d steps, seed %lu; each family trains at its best:\n",
                 s.lr_sweep.size(), plan.family_reference.size(), s.sweep_steps,
                 static_cast<unsigned long>(s.sweep_seed));
    for (const auto& [family, m] : plan.family_reference) {
      std::string lrs;
      for (double lr : s.lr_sweep) lrs += (lrs.empty() ? "" : ", ") + format_lr(lr);
      std::fprintf(out, "  %-8s %s at lr %s\n", family.c_str(), describe_model(m).c_str(),
                   lrs.c_str());
    }
  } else {
    std::fprintf(out, "\nno learning-rate sweep: every run uses lr %s\n",
                 format_lr(s.lr_sweep.empty() ? plan.base.train.lr : s.lr_sweep[0]).c_str());
  }
  std::string seeds;
  for (uint64_t seed : s.seeds) seeds += (seeds.empty() ? "" : ", ") + std::to_string(seed);
  std::fprintf(out, "\nmain grid: %zu variants x seeds [%s] = %zu runs of %d steps\n",
               s.variants.size(), seeds.c_str(), plan.runs.size(), s.steps);
  for (const VariantSpec& v : s.variants) {
    if ((v.steps == 0 || v.steps == s.steps) && (v.seeds.empty() || v.seeds == s.seeds)) continue;
    std::string vs;
    for (uint64_t seed : v.seeds) vs += (vs.empty() ? "" : ", ") + std::to_string(seed);
    std::fprintf(out, "  except %s: seeds [%s], %d steps\n", v.name.c_str(), vs.c_str(), v.steps);
  }
  long steps = 0;
  for (const auto* list : {&plan.sweep_runs, &plan.runs}) {
    for (const PlannedRun& r : *list) steps += r.config.train.steps;
  }
  std::fprintf(out, "total: %zu runs, %ld training steps\n",
               plan.sweep_runs.size() + plan.runs.size(), steps);
  if (!measure) return;
  // Time estimate from a measured step and forward pass per distinct model: training steps,
  // validation during training, the audit (forward passes plus one training batch), and the
  // evaluation (validation batches at every loop count and threshold, plus task requests: one
  // per cloze item and four per multiple-choice item, batch_size to a forward pass).
  std::map<std::string, StepTiming> per_model;
  auto timing = [&](const model::Config& c) {
    const std::string key = describe_model(c.model);
    auto it = per_model.find(key);
    if (it == per_model.end()) it = per_model.emplace(key, hooks.step_seconds(c, s.threads)).first;
    return it->second;
  };
  double total = 0;
  for (const auto* list : {&plan.sweep_runs, &plan.runs}) {
    for (const PlannedRun& r : *list) {
      const StepTiming t = timing(r.config);
      const model::TrainConfig& tc = r.config.train;
      const model::ModelConfig& m = r.config.model;
      const int evals = (tc.eval_interval > 0 ? tc.steps / tc.eval_interval : 0) + 1;
      double forwards = static_cast<double>(evals) * tc.eval_batches;
      double steps = tc.steps;
      if (!r.sweep) {
        double passes = 1;  // the trained loop count
        if (m.n_loops > 1) {
          for (int k : s.eval_loops) passes += static_cast<double>(k) / m.n_loops;
          passes += static_cast<double>(s.halt_thresholds.size());
        }
        forwards += s.audit_batches + s.eval_batches * passes +
                    5.0 * s.eval_items / std::max(1, tc.batch_size);
        steps += 1;
      }
      total += steps * t.step + forwards * t.forward;
    }
  }
  std::fprintf(out, "measured per model (%d threads):\n", s.threads);
  for (const auto& [model, t] : per_model) {
    std::fprintf(out, "  %-44s %6.3f s/step (%6.0f tokens/s), %6.3f s/forward\n", model.c_str(),
                 t.step, batch_tokens / t.step, t.forward);
  }
  std::fprintf(out,
               "estimated time: %s (training, validation, audit and evaluation; the machine's "
               "current load included)\n",
               train::format_seconds(total).c_str());
}

}  // namespace internal

std::string format_lr(double lr) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", lr);
  return buf;
}

ExperimentHooks default_experiment_hooks() {
  ExperimentHooks h;
  h.solve = [](const model::ModelConfig& vanilla, int loops, model::Balance balance,
               model::IterAdaLNMode mode,
               double scale) { return model::solve_budget(vanilla, loops, balance, mode, scale); };
  h.train = [](const model::Config& c, const train::TrainOptions& o) { train::run_training(c, o); };
  h.audit = [](const std::string& dir, const eval::AuditOptions& o) { eval::run_audit(dir, o); };
  h.eval = [](const std::string& dir, const eval::EvalOptions& o) { eval::run_eval(dir, o); };
  h.step_seconds = measure_step_seconds;
  h.figures = model::budget_figures;
  return h;
}

ExperimentPlan plan_experiment(const ExperimentSpec& spec, const ExperimentHooks& hooks) {
  ExperimentPlan plan;
  plan.spec = spec;
  try {
    plan.base = model::load_config(spec.base_config);
  } catch (const model::ConfigError& e) {
    throw model::ConfigError(spec.source + ": experiment.base_config: " + e.what());
  }
  if (!spec.data_dir.empty()) plan.base.data.dir = spec.data_dir;
  // As the trainer records it (absolute), so a finished run's config.toml compares equal.
  plan.base.data.dir = fs::absolute(plan.base.data.dir).lexically_normal().string();
  const model::ModelConfig& vm = plan.base.model;
  if (vm.n_loops != 1 || vm.adaln()) {
    throw model::ConfigError(spec.source + ": experiment.base_config " + spec.base_config +
                             " must be a Vanilla MoE config (n_loops = 1, iter_adaln = \"off\")");
  }
  auto solve = [&](const std::string& what, model::Balance b, model::IterAdaLNMode mode,
                   double scale) {
    try {
      return hooks.solve(vm, spec.loops, b, mode, scale);
    } catch (const std::exception& e) {
      throw model::ConfigError(spec.source + ": cannot solve the LoopMoE budget for " + what +
                               ": " + e.what());
    }
  };
  bool any_vanilla = false, any_loop = false;
  for (const VariantSpec& v : spec.variants) {
    if (v.vanilla()) {
      plan.models[v.name] = vm;
      any_vanilla = true;
    } else {
      plan.models[v.name] =
          solve("variant '" + v.name + "'", v.balance, v.iter_adaln, v.expert_scale).loopmoe_config;
      any_loop = true;
    }
  }
  // The reference of each family is what the sweep tunes on: vanilla itself, and the LoopMoE
  // the paper proposes (joint IterAdaLN, experts balancing, solved expert count).
  if (any_vanilla) plan.family_reference[kVanillaFamily] = vm;
  if (any_loop) {
    const model::SolvedBudget ref =
        solve("the reference (joint, experts, 1.0)", model::Balance::kExperts,
              model::IterAdaLNMode::kJoint, 1.0);
    plan.family_reference[kLoopMoEFamily] = ref.loopmoe_config;
    try {
      plan.budget_json = model::budget_json(ref);
    } catch (const std::exception&) {
      plan.budget_json.clear();  // the report then shows only per-variant figures
    }
  }
  const double nan = std::nan("");
  // One candidate needs no sweep: it is the learning rate.
  if (spec.lr_sweep.size() > 1) {
    for (const auto& [family, model] : plan.family_reference) {
      for (double lr : spec.lr_sweep) {
        PlannedRun r;
        r.name = family + "_lr" + format_lr(lr);
        r.dir = "sweep/" + r.name;
        r.variant = family;
        r.family = family;
        r.sweep = true;
        r.seed = spec.sweep_seed;
        r.config = run_config(plan, model, spec.sweep_steps, spec.sweep_seed, lr, true);
        plan.sweep_runs.push_back(r);
      }
    }
  }
  for (const VariantSpec& v : spec.variants) {
    for (uint64_t seed : v.seeds.empty() ? spec.seeds : v.seeds) {
      PlannedRun r;
      r.name = v.name + "_s" + std::to_string(seed);
      r.dir = "runs/" + r.name;
      r.variant = v.name;
      r.family = v.model;
      r.seed = seed;
      r.config = run_config(plan, plan.models.at(v.name), v.steps > 0 ? v.steps : spec.steps, seed,
                            nan, false);
      plan.runs.push_back(r);
    }
  }
  for (auto* list : {&plan.sweep_runs, &plan.runs}) {
    for (PlannedRun& r : *list) {
      model::Config check = r.config;
      if (std::isnan(check.train.lr)) check.train.lr = plan.base.train.lr;
      try {
        model::validate(check);
      } catch (const model::ConfigError& e) {
        throw model::ConfigError(spec.source + ": run " + r.name + ": " + e.what());
      }
    }
  }
  return plan;
}

std::map<std::string, double> choose_learning_rates(const std::vector<SweepPoint>& points) {
  std::map<std::string, double> best_loss, best_lr;
  for (const SweepPoint& p : points) {
    const double loss = std::isnan(p.val_loss) ? INFINITY : p.val_loss;
    auto it = best_loss.find(p.family);
    if (it == best_loss.end() || loss < it->second) {
      best_loss[p.family] = loss;
      best_lr[p.family] = p.lr;
    }
  }
  for (const auto& [family, loss] : best_loss) {
    if (!std::isfinite(loss)) {
      throw std::runtime_error("learning-rate sweep: every candidate diverged for " + family +
                               "; add smaller values to experiment.lr_sweep");
    }
  }
  return best_lr;
}

void apply_learning_rates(ExperimentPlan& plan, const std::map<std::string, double>& lrs) {
  for (PlannedRun& r : plan.runs) {
    auto it = lrs.find(r.family);
    if (it == lrs.end()) throw std::logic_error("no learning rate for family " + r.family);
    r.config.train.lr = it->second;
  }
}

}  // namespace loopmoe::experiment
