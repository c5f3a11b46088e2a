#include "experiment/experiment.h"

#include <toml++/toml.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "model/error.h"
#include "model/model.h"
#include "model/toml_util.h"
#include "train/format.h"

namespace loopmoe {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using ojson = nlohmann::ordered_json;

// ---------------------------------------------------------------------------------------------
// Spec parsing

const std::vector<std::string> kExperimentKeys = {
    "name",       "base_config",     "loops",         "steps",
    "seeds",      "lr_sweep",        "sweep_steps",   "sweep_seed",
    "threads",    "eval_batches",    "audit_batches", "eval_items",
    "eval_loops", "halt_thresholds", "eval_interval", "checkpoint_interval",
    "data_dir"};
const std::vector<std::string> kVariantKeys = {"name", "model", "iter_adaln", "balance",
                                               "expert_scale"};

// The budget's parser, with the spec file and key in the message.
Balance parse_balance_name(const std::string& name, const std::string& where) {
  try {
    return parse_balance(name);
  } catch (const ConfigError& e) {
    throw ConfigError(where + ": " + e.what());
  }
}

// Typed access to one table of the spec; every failure names the file and "table.key".
struct TableReader {
  const toml::table& table;
  const std::string& source;
  std::string prefix;  // "experiment", "variant[2]"

  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw ConfigError(source + ": " + prefix + "." + key + " " + what);
  }
  void check_keys(const std::vector<std::string>& known) const {
    for (auto&& [key, node] : table) {
      const std::string k(key.str());
      if (std::find(known.begin(), known.end(), k) == known.end()) {
        throw ConfigError(source + ": unknown key " + prefix + "." + k);
      }
      (void)node;
    }
  }
  bool has(const std::string& key) const { return table.get(key) != nullptr; }
  int64_t integer(const std::string& key, int64_t fallback, int64_t lo, int64_t hi) const {
    const toml::node* n = table.get(key);
    if (n == nullptr) return fallback;
    if (!n->is_integer()) fail(key, "must be an integer");
    const int64_t x = *n->value<int64_t>();
    if (x < lo || x > hi) {
      fail(key, "= " + std::to_string(x) + " is out of range [" + std::to_string(lo) + ", " +
                    std::to_string(hi) + "]");
    }
    return x;
  }
  double number(const std::string& key, double fallback, double lo, double hi) const {
    const toml::node* n = table.get(key);
    if (n == nullptr) return fallback;
    if (!n->is_number()) fail(key, "must be a number");
    const double x = *n->value<double>();
    if (!(x >= lo && x <= hi)) {
      std::ostringstream os;
      os << "= " << x << " is out of range [" << lo << ", " << hi << "]";
      fail(key, os.str());
    }
    return x;
  }
  std::string string(const std::string& key, const std::string& fallback) const {
    const toml::node* n = table.get(key);
    if (n == nullptr) return fallback;
    if (!n->is_string()) fail(key, "must be a string");
    return *n->value<std::string>();
  }
  std::string required_string(const std::string& key) const {
    if (!has(key)) fail(key, "is required");
    const std::string s = string(key, "");
    if (s.empty()) fail(key, "must not be empty");
    return s;
  }
  template <class T>
  std::vector<T> array(const std::string& key, const std::vector<T>& fallback, double lo,
                       double hi) const {
    const toml::node* n = table.get(key);
    if (n == nullptr) return fallback;
    const toml::array* arr = n->as_array();
    if (arr == nullptr) fail(key, "must be an array");
    std::vector<T> out;
    for (const toml::node& e : *arr) {
      const bool ok = std::is_integral_v<T> ? e.is_integer() : e.is_number();
      if (!ok) fail(key, std::is_integral_v<T> ? "must hold integers" : "must hold numbers");
      const double x = *e.value<double>();
      if (!(x >= lo && x <= hi)) {
        std::ostringstream os;
        os << "holds " << x << ", out of range [" << lo << ", " << hi << "]";
        fail(key, os.str());
      }
      out.push_back(std::is_integral_v<T> ? static_cast<T>(*e.value<int64_t>())
                                          : static_cast<T>(x));
    }
    std::vector<T> sorted = out;
    std::sort(sorted.begin(), sorted.end());
    if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
      fail(key, "holds a value twice");
    }
    return out;
  }
};

bool valid_name(const std::string& s) {
  if (s.empty() || s.size() > 64) return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.';
  });
}

std::string resolve_base_config(const std::string& path, const std::string& source) {
  const fs::path p(path);
  if (p.is_absolute()) return p.string();
  const fs::path next_to_spec = (fs::path(source).parent_path() / p).lexically_normal();
  if (fs::exists(next_to_spec)) return next_to_spec.string();
  return p.string();  // relative to the working directory; load_config reports it if missing
}

// ---------------------------------------------------------------------------------------------
// Small file helpers

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) return "";
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Whole-file replacement via rename, so an interrupted write never leaves a half marker behind.
void write_text_atomic(const fs::path& p, const std::string& text) {
  const fs::path tmp = p.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error(tmp.string() + ": cannot write");
    out << text;
    if (!out) throw std::runtime_error(tmp.string() + ": write failed");
  }
  fs::rename(tmp, p);
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

// ---------------------------------------------------------------------------------------------
// Default hooks

// Wall time of one optimizer-free training step (forward + backward) and of one forward pass on
// random tokens: enough for a plan's time estimate without touching the dataset.
StepTiming measure_step_seconds(const Config& cfg, int threads) {
  set_num_threads(threads);
  const int B = cfg.train.batch_size, T = cfg.model.seq_len;
  Model model(cfg.model);
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
    return std::chrono::duration<double>(Clock::now() - t0).count() / reps;
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

// ---------------------------------------------------------------------------------------------
// Planning helpers

Config run_config(const ExperimentPlan& plan, const ModelConfig& model, int steps, uint64_t seed,
                  double lr, bool sweep) {
  const ExperimentSpec& spec = plan.spec;
  Config c = plan.base;
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

std::string describe_model(const ModelConfig& m) {
  std::ostringstream os;
  os << m.n_layers << "x" << m.n_loops << " E" << m.n_experts << " k" << m.top_k << " f"
     << m.expert_hidden << " inner" << m.attn_inner() << " " << to_string(m.iter_adaln);
  if (m.adaln()) os << " dc" << m.cond_dim;
  return os.str();
}

ojson variant_json(const VariantSpec& v, const ModelConfig& m) {
  ojson j;
  j["name"] = v.name;
  j["model"] = v.model;
  j["iter_adaln"] = to_string(m.iter_adaln);
  j["balance"] = v.vanilla() ? "-" : to_string(v.balance);
  j["expert_scale"] = v.expert_scale;
  j["n_layers"] = m.n_layers;
  j["n_loops"] = m.n_loops;
  j["n_experts"] = m.n_experts;
  j["expert_hidden"] = m.expert_hidden;
  j["attn_inner"] = m.attn_inner();
  j["cond_dim"] = m.cond_dim;
  return j;
}

}  // namespace

// -----------------------------------------------------------------------------------------------

std::string format_lr(double lr) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", lr);
  return buf;
}

double final_val_loss(const std::string& run_dir) {
  std::ifstream in(fs::path(run_dir) / "metrics.jsonl");
  std::string line;
  double last = std::nan("");
  while (std::getline(in, line)) {
    if (line.find("\"val_loss\"") == std::string::npos) continue;
    try {
      const auto j = nlohmann::json::parse(line);
      if (j.contains("val_loss") && j["val_loss"].is_number()) last = j["val_loss"].get<double>();
    } catch (const nlohmann::json::exception&) {
      // A torn last line of an interrupted run: ignore it, the resumed run rewrites it.
    }
  }
  return last;
}

std::vector<std::string> experiment_spec_keys() {
  std::vector<std::string> keys;
  for (const auto& k : kExperimentKeys) keys.push_back("experiment." + k);
  for (const auto& k : kVariantKeys) keys.push_back("variant." + k);
  return keys;
}

ExperimentSpec parse_experiment_spec(const std::string& text, const std::string& source) {
  const toml::table root = parse_toml(text, source);
  ExperimentSpec spec;
  spec.source = source;
  spec.text = text;
  for (auto&& [key, node] : root) {
    const std::string k(key.str());
    if (k != "experiment" && k != "variant") {
      throw ConfigError(source + ": unknown section [" + k + "] (expected [experiment] and " +
                        "[[variant]])");
    }
    (void)node;
  }
  const toml::table* exp = root["experiment"].as_table();
  if (exp == nullptr) throw ConfigError(source + ": missing [experiment] table");
  TableReader r{*exp, source, "experiment"};
  r.check_keys(kExperimentKeys);
  spec.name = r.string("name", spec.name);
  if (!valid_name(spec.name)) {
    r.fail("name", "must be 1-64 characters of letters, digits, '_', '-', '.'");
  }
  spec.base_config = resolve_base_config(r.required_string("base_config"), source);
  spec.loops = static_cast<int>(r.integer("loops", spec.loops, 1, 1024));
  spec.steps = static_cast<int>(r.integer("steps", spec.steps, 1, 1000000000));
  spec.seeds = r.array<uint64_t>("seeds", spec.seeds, 0, 9.2e18);
  if (spec.seeds.empty()) r.fail("seeds", "must not be empty");
  spec.lr_sweep = r.array<double>("lr_sweep", spec.lr_sweep, 1e-9, 10.0);
  spec.sweep_steps = static_cast<int>(r.integer("sweep_steps", spec.sweep_steps, 1, 1000000000));
  spec.sweep_seed = static_cast<uint64_t>(
      r.integer("sweep_seed", static_cast<int64_t>(spec.sweep_seed), 0, INT64_MAX));
  spec.threads = static_cast<int>(r.integer("threads", spec.threads, 1, 1024));
  spec.eval_batches = static_cast<int>(r.integer("eval_batches", spec.eval_batches, 1, 1000000));
  spec.audit_batches = static_cast<int>(r.integer("audit_batches", spec.audit_batches, 1, 1000000));
  spec.eval_items = static_cast<int>(r.integer("eval_items", spec.eval_items, 0, 1000000));
  spec.eval_loops = r.array<int>("eval_loops", spec.eval_loops, 1, 1024);
  spec.halt_thresholds = r.array<double>("halt_thresholds", spec.halt_thresholds, 1e-12, 1e6);
  spec.eval_interval = static_cast<int>(r.integer("eval_interval", 0, 0, 1000000000));
  spec.checkpoint_interval =
      static_cast<int>(r.integer("checkpoint_interval", spec.checkpoint_interval, 1, 1000000000));
  spec.data_dir = r.string("data_dir", "");

  const toml::node* vnode = root.get("variant");
  if (vnode == nullptr) throw ConfigError(source + ": no [[variant]] tables: nothing to run");
  const toml::array* variants = vnode->as_array();
  if (variants == nullptr || !variants->is_array_of_tables()) {
    throw ConfigError(source + ": variant must be an array of tables ([[variant]])");
  }
  std::set<std::string> names;
  for (size_t i = 0; i < variants->size(); ++i) {
    TableReader v{*variants->get(i)->as_table(), source, "variant[" + std::to_string(i) + "]"};
    v.check_keys(kVariantKeys);
    VariantSpec var;
    var.name = v.required_string("name");
    if (!valid_name(var.name)) {
      v.fail("name", "= '" + var.name + "' must be 1-64 characters of letters, digits, '_', " +
                         "'-', '.' (it names run directories)");
    }
    if (!names.insert(var.name).second) v.fail("name", "= '" + var.name + "' is used twice");
    v.prefix = "variant '" + var.name + "'";
    var.model = v.required_string("model");
    if (var.model != kVanillaFamily && var.model != kLoopMoEFamily) {
      v.fail("model", "= '" + var.model + "' must be \"vanilla\" or \"loopmoe\"");
    }
    if (var.vanilla()) {
      // The vanilla model is the base config itself: these keys would be silently ignored.
      for (const char* k : {"iter_adaln", "balance", "expert_scale"}) {
        if (v.has(k)) v.fail(k, "applies to loopmoe variants only (vanilla is the base config)");
      }
      var.iter_adaln = IterAdaLNMode::kOff;
    } else {
      const std::string mode = v.string("iter_adaln", "joint");
      try {
        var.iter_adaln = parse_iter_adaln_mode(mode);
      } catch (const ConfigError& e) {
        v.fail("iter_adaln", std::string(": ") + e.what());
      }
      var.balance =
          parse_balance_name(v.string("balance", "experts"), source + ": " + v.prefix + ".balance");
      var.expert_scale = v.number("expert_scale", 1.0, 0.01, 100.0);
    }
    spec.variants.push_back(var);
  }
  if (spec.variants.empty()) throw ConfigError(source + ": no [[variant]] tables: nothing to run");
  return spec;
}

ExperimentSpec load_experiment_spec(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError(path + ": cannot open experiment spec");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_experiment_spec(ss.str(), path);
}

ExperimentHooks default_experiment_hooks() {
  ExperimentHooks h;
  h.solve = [](const ModelConfig& vanilla, int loops, Balance balance, IterAdaLNMode mode,
               double scale) { return solve_budget(vanilla, loops, balance, mode, scale); };
  h.train = [](const Config& c, const TrainOptions& o) { train(c, o); };
  h.audit = [](const std::string& dir, const AuditOptions& o) { run_audit(dir, o); };
  h.eval = [](const std::string& dir, const EvalOptions& o) { run_eval(dir, o); };
  h.step_seconds = measure_step_seconds;
  h.figures = budget_figures;
  return h;
}

ExperimentPlan plan_experiment(const ExperimentSpec& spec, const ExperimentHooks& hooks) {
  ExperimentPlan plan;
  plan.spec = spec;
  try {
    plan.base = load_config(spec.base_config);
  } catch (const ConfigError& e) {
    throw ConfigError(spec.source + ": experiment.base_config: " + e.what());
  }
  if (!spec.data_dir.empty()) plan.base.data.dir = spec.data_dir;
  // As the trainer records it (absolute), so a finished run's config.toml compares equal.
  plan.base.data.dir = fs::absolute(plan.base.data.dir).lexically_normal().string();
  const ModelConfig& vm = plan.base.model;
  if (vm.n_loops != 1 || vm.adaln()) {
    throw ConfigError(spec.source + ": experiment.base_config " + spec.base_config +
                      " must be a Vanilla MoE config (n_loops = 1, iter_adaln = \"off\")");
  }
  auto solve = [&](const std::string& what, Balance b, IterAdaLNMode mode, double scale) {
    try {
      return hooks.solve(vm, spec.loops, b, mode, scale);
    } catch (const std::exception& e) {
      throw ConfigError(spec.source + ": cannot solve the LoopMoE budget for " + what + ": " +
                        e.what());
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
    const SolvedBudget ref =
        solve("the reference (joint, experts, 1.0)", Balance::kExperts, IterAdaLNMode::kJoint, 1.0);
    plan.family_reference[kLoopMoEFamily] = ref.loopmoe_config;
    try {
      plan.budget_json = budget_json(ref);
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
    for (uint64_t seed : spec.seeds) {
      PlannedRun r;
      r.name = v.name + "_s" + std::to_string(seed);
      r.dir = "runs/" + r.name;
      r.variant = v.name;
      r.family = v.model;
      r.seed = seed;
      r.config = run_config(plan, plan.models.at(v.name), spec.steps, seed, nan, false);
      plan.runs.push_back(r);
    }
  }
  for (auto* list : {&plan.sweep_runs, &plan.runs}) {
    for (PlannedRun& r : *list) {
      Config check = r.config;
      if (std::isnan(check.train.lr)) check.train.lr = plan.base.train.lr;
      try {
        validate(check);
      } catch (const ConfigError& e) {
        throw ConfigError(spec.source + ": run " + r.name + ": " + e.what());
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

namespace {

// The state machine of one run directory: skip when done, otherwise train (resuming from a
// checkpoint), audit, evaluate, and only then write the `done` marker.
class Runner {
 public:
  Runner(const ExperimentPlan& plan, const ExperimentOptions& options, const ExperimentHooks& hooks,
         std::FILE* log)
      : plan_(plan), opt_(options), hooks_(hooks), log_(log), start_(Clock::now()) {
    total_runs_ = static_cast<int>(plan.sweep_runs.size() + plan.runs.size());
    for (const auto* list : {&plan.sweep_runs, &plan.runs}) {
      for (const PlannedRun& r : *list) remaining_steps_ += r.config.train.steps;
    }
  }

  // Returns the final validation loss (+inf for a diverged sweep run).
  double execute(const PlannedRun& run) {
    ++index_;
    const fs::path dir = fs::path(opt_.out_dir) / run.dir;
    const std::string tag = "[run " + std::to_string(index_) + "/" + std::to_string(total_runs_) +
                            "] " + (run.sweep ? "sweep " : "") + run.name + ": ";
    const std::string want = to_toml(run.config);
    remaining_steps_ -= run.config.train.steps;
    if (fs::exists(dir / "done")) {
      const std::string have = read_text(dir / "config.toml");
      if (have != want) {
        throw ConfigError(dir.string() + " was finished with a different config (" +
                          differing_keys(have, want) +
                          "): the spec changed; remove that run directory or use another --out");
      }
      ++summary_.skipped;
      const double v = done_val_loss(dir);
      std::fprintf(log_, "%sfinished earlier, skipped (val %s)\n", tag.c_str(),
                   format_fixed(v, 4).c_str());
      std::fflush(log_);
      return v;
    }
    const auto t0 = Clock::now();
    const bool resume = fs::exists(dir / "checkpoint.bin");
    std::fprintf(log_, "%s%s (%d steps, lr %s) ...", tag.c_str(), resume ? "resuming" : "training",
                 run.config.train.steps, format_lr(run.config.train.lr).c_str());
    std::fflush(log_);
    if (opt_.verbose) std::fprintf(log_, "\n");
    TrainOptions to;
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
      if (run.sweep && std::string(e.what()).find("loss became") != std::string::npos) {
        diverged = true;
        divergence = e.what();
      } else {
        fail(run, "training", e);
      }
    }
    double val = diverged ? INFINITY : final_val_loss(dir.string());
    if (!run.sweep) {
      std::fprintf(log_, " audit ...");
      std::fflush(log_);
      AuditOptions ao;
      ao.batches = plan_.spec.audit_batches;
      ao.threads = plan_.spec.threads;
      try {
        hooks_.audit(dir.string(), ao);
      } catch (const std::exception& e) {
        fail(run, "audit", e);
      }
      std::fprintf(log_, " eval ...");
      std::fflush(log_);
      EvalOptions eo;
      const ModelConfig& m = run.config.model;
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
    const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
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
    const double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
    const double eta = elapsed / std::max(1, steps_trained_) * remaining_steps_;
    std::fprintf(log_, " %s (%s, ETA %s)\n",
                 diverged ? "diverged" : ("val " + format_fixed(val, 4)).c_str(),
                 format_seconds(seconds).c_str(), format_seconds(eta).c_str());
    std::fflush(log_);
    return val;
  }

  ExperimentSummary summary() const { return summary_; }

 private:
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
      const auto j = nlohmann::json::parse(read_text(dir / "done"));
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
  Clock::time_point start_;
  int index_ = 0, total_runs_ = 0, steps_trained_ = 0;
  long remaining_steps_ = 0;
  ExperimentSummary summary_;
};

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
  auto row = [&](const std::string& name, const std::string& family, const ModelConfig& m) {
    double params = NAN, flops = NAN, ratio = NAN;
    try {
      const BudgetFigures f = hooks.figures(m, batch_tokens);
      params = f.total_params;
      flops = f.flops_per_token_forward;
      ratio = f.attn_ffn_active_ratio;
    } catch (const std::exception&) {
      // Budget figures unavailable: the plan is still worth printing.
    }
    std::fprintf(out, "%-18s %-8s %-40s %9s %10s %9s\n", name.c_str(), family.c_str(),
                 describe_model(m).c_str(), format_si(params, 3).c_str(),
                 format_si(flops, 3).c_str(), format_fixed(ratio, 3).c_str());
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
  auto timing = [&](const Config& c) {
    const std::string key = describe_model(c.model);
    auto it = per_model.find(key);
    if (it == per_model.end()) it = per_model.emplace(key, hooks.step_seconds(c, s.threads)).first;
    return it->second;
  };
  double total = 0;
  for (const auto* list : {&plan.sweep_runs, &plan.runs}) {
    for (const PlannedRun& r : *list) {
      const StepTiming t = timing(r.config);
      const TrainConfig& tc = r.config.train;
      const ModelConfig& m = r.config.model;
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
               format_seconds(total).c_str());
}

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

}  // namespace

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
    throw ConfigError(train_bin.string() + ": no dataset (prepare it with `loopmoe data " +
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
      const double v = runner.execute(r);
      points.push_back({r.family, r.config.train.lr, v});
      table.push_back({{"family", r.family},
                       {"lr", r.config.train.lr},
                       {"val_loss", std::isfinite(v) ? ojson(v) : ojson(nullptr)},
                       {"diverged", std::isinf(v)},
                       {"run", r.dir}});
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
  for (const PlannedRun& r : plan.runs) runner.execute(r);
  ExperimentSummary summary = runner.summary();
  summary.learning_rates = lrs;
  std::fprintf(log, "\nexperiment %s done: %d runs trained now, %d finished earlier\n",
               spec.name.c_str(), summary.trained, summary.skipped);
  std::fprintf(log, "report: loopmoe report --runs %s\n", opt.out_dir.c_str());
  return summary;
}

}  // namespace loopmoe
