// Experiment spec parsing (experiment.h): the [experiment] and [[variant]] tables of a spec file,
// every key typed and range-checked, errors naming the file and "table.key".
#include <toml++/toml.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <filesystem>
#include <set>
#include <sstream>

#include "common/text_file.h"
#include "experiment/experiment.h"
#include "model/error.h"
#include "model/toml_util.h"

namespace loopmoe::experiment {
namespace {

namespace fs = std::filesystem;

const std::vector<std::string> kExperimentKeys = {
    "name",       "base_config",     "loops",         "steps",
    "seeds",      "lr_sweep",        "sweep_steps",   "sweep_seed",
    "threads",    "eval_batches",    "audit_batches", "eval_items",
    "eval_loops", "halt_thresholds", "eval_interval", "checkpoint_interval",
    "data_dir"};
const std::vector<std::string> kVariantKeys = {"name",         "model", "iter_adaln", "balance",
                                               "expert_scale", "steps", "seeds"};

// The budget's parser, with the spec file and key in the message.
model::Balance parse_balance_name(const std::string& name, const std::string& where) {
  try {
    return model::parse_balance(name);
  } catch (const model::ConfigError& e) {
    throw model::ConfigError(where + ": " + e.what());
  }
}

// Typed access to one table of the spec; every failure names the file and "table.key".
struct TableReader {
  const toml::table& table;
  const std::string& source;
  std::string prefix;  // "experiment", "variant[2]"

  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw model::ConfigError(source + ": " + prefix + "." + key + " " + what);
  }
  void check_keys(const std::vector<std::string>& known) const {
    for (auto&& [key, node] : table) {
      const std::string k(key.str());
      if (std::find(known.begin(), known.end(), k) == known.end()) {
        throw model::ConfigError(source + ": unknown key " + prefix + "." + k);
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

}  // namespace

std::vector<std::string> experiment_spec_keys() {
  std::vector<std::string> keys;
  for (const auto& k : kExperimentKeys) keys.push_back("experiment." + k);
  for (const auto& k : kVariantKeys) keys.push_back("variant." + k);
  return keys;
}

ExperimentSpec parse_experiment_spec(const std::string& text, const std::string& source) {
  const toml::table root = model::parse_toml(text, source);
  ExperimentSpec spec;
  spec.source = source;
  spec.text = text;
  for (auto&& [key, node] : root) {
    const std::string k(key.str());
    if (k != "experiment" && k != "variant") {
      throw model::ConfigError(source + ": unknown section [" + k +
                               "] (expected [experiment] and " + "[[variant]])");
    }
    (void)node;
  }
  const toml::table* exp = root["experiment"].as_table();
  if (exp == nullptr) throw model::ConfigError(source + ": missing [experiment] table");
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
  if (vnode == nullptr)
    throw model::ConfigError(source + ": no [[variant]] tables: nothing to run");
  const toml::array* variants = vnode->as_array();
  if (variants == nullptr || !variants->is_array_of_tables()) {
    throw model::ConfigError(source + ": variant must be an array of tables ([[variant]])");
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
      var.iter_adaln = model::IterAdaLNMode::kOff;
    } else {
      const std::string mode = v.string("iter_adaln", "joint");
      try {
        var.iter_adaln = model::parse_iter_adaln_mode(mode);
      } catch (const model::ConfigError& e) {
        v.fail("iter_adaln", std::string(": ") + e.what());
      }
      var.balance =
          parse_balance_name(v.string("balance", "experts"), source + ": " + v.prefix + ".balance");
      var.expert_scale = v.number("expert_scale", 1.0, 0.01, 100.0);
    }
    // A shorter or single-seed ablation beside the main comparison (experiment.steps and
    // experiment.seeds are the defaults).
    var.steps = static_cast<int>(v.integer("steps", spec.steps, 1, 1000000000));
    var.seeds = v.array<uint64_t>("seeds", spec.seeds, 0, 9.2e18);
    if (var.seeds.empty()) v.fail("seeds", "must not be empty");
    spec.variants.push_back(var);
  }
  if (spec.variants.empty())
    throw model::ConfigError(source + ": no [[variant]] tables: nothing to run");
  return spec;
}

ExperimentSpec load_experiment_spec(const std::string& path) {
  const std::optional<std::string> text = common::read_text_if_present(path);
  if (!text) throw model::ConfigError(path + ": cannot open experiment spec");
  return parse_experiment_spec(*text, path);
}

}  // namespace loopmoe::experiment
