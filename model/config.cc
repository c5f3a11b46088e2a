#include "model/config.h"

#include <toml++/toml.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <set>
#include <sstream>

#include "common/text_file.h"
#include "model/error.h"
#include "model/toml_util.h"

namespace loopmoe::model {
namespace {

// The one list of config fields: parsing, printing and documentation checks all walk it.
template <class Visitor>
void visit_fields(Config& c, Visitor&& v) {
  ModelConfig& m = c.model;
  v("model", "vocab_size", m.vocab_size, 2.0, 1e9);
  v("model", "seq_len", m.seq_len, 1.0, 1e6);
  v("model", "d_model", m.d_model, 2.0, 65536.0);
  v("model", "n_heads", m.n_heads, 1.0, 1024.0);
  v("model", "head_dim", m.head_dim, 2.0, 4096.0);
  v("model", "n_layers", m.n_layers, 1.0, 1024.0);
  v("model", "n_loops", m.n_loops, 1.0, 1024.0);
  v("model", "n_experts", m.n_experts, 1.0, 65536.0);
  v("model", "top_k", m.top_k, 1.0, 64.0);
  v("model", "expert_hidden", m.expert_hidden, 1.0, 1e6);
  v("model", "iter_adaln", m.iter_adaln, 0.0, 0.0);
  v("model", "cond_dim", m.cond_dim, 2.0, 65536.0);
  v("model", "tie_embeddings", m.tie_embeddings, 0.0, 0.0);
  v("model", "renormalize", m.renormalize, 0.0, 0.0);
  v("model", "capacity_factor", m.capacity_factor, 0.0, 1e6);
  v("model", "aux_loss_coef", m.aux_loss_coef, 0.0, 1e6);
  v("model", "z_loss_coef", m.z_loss_coef, 0.0, 1e6);
  v("model", "rope_theta", m.rope_theta, 1.0, 1e12);
  v("model", "init_std", m.init_std, 1e-12, 10.0);
  TrainConfig& t = c.train;
  v("train", "batch_size", t.batch_size, 1.0, 1e6);
  v("train", "steps", t.steps, 1.0, 1e9);
  v("train", "lr", t.lr, 0.0, 10.0);
  v("train", "min_lr_ratio", t.min_lr_ratio, 0.0, 1.0);
  v("train", "warmup_steps", t.warmup_steps, 0.0, 1e9);
  v("train", "weight_decay", t.weight_decay, 0.0, 10.0);
  v("train", "beta1", t.beta1, 0.0, 0.999999);
  v("train", "beta2", t.beta2, 0.0, 0.99999999);
  v("train", "eps", t.eps, 1e-30, 1.0);
  v("train", "grad_clip", t.grad_clip, 0.0, 1e9);
  v("train", "seed", t.seed, 0.0, 9.2e18);
  v("train", "eval_interval", t.eval_interval, 0.0, 1e9);
  v("train", "eval_batches", t.eval_batches, 1.0, 1e6);
  v("train", "checkpoint_interval", t.checkpoint_interval, 0.0, 1e9);
  v("train", "log_interval", t.log_interval, 1.0, 1e9);
  v("train", "grad_groups", t.grad_groups, 1.0, 65536.0);
  v("train", "nonfinite", t.nonfinite, 0.0, 0.0);
  v("train", "loss_spike_factor", t.loss_spike_factor, 0.0, 1e9);
  v("train", "loss_spike_action", t.loss_spike_action, 0.0, 0.0);
  v("train", "loss_spike_window", t.loss_spike_window, 1.0, 1e6);
  v("train", "precision", t.precision, 0.0, 0.0);
  v("data", "dir", c.data.dir, 0.0, 0.0);
}

[[noreturn]] void fail(const std::string& source, const std::string& what) {
  throw ConfigError(source + ": " + what);
}

struct Reader {
  const toml::table& root;
  const std::string& source;

  const toml::node* find(const char* section, const char* key) const {
    const toml::node* sec = root.get(section);
    if (sec == nullptr) return nullptr;
    return sec->as_table()->get(key);
  }
  std::string name(const char* section, const char* key) const {
    return std::string(section) + "." + key;
  }
  void range(const char* s, const char* k, double x, double lo, double hi) const {
    if (!(x >= lo && x <= hi)) {
      std::ostringstream os;
      os << name(s, k) << " = " << x << " is out of range [" << lo << ", " << hi << "]";
      fail(source, os.str());
    }
  }
  void operator()(const char* s, const char* k, int& out, double lo, double hi) const {
    const toml::node* n = find(s, k);
    if (n == nullptr) return;
    if (!n->is_integer()) fail(source, name(s, k) + " must be an integer");
    int64_t x = *n->value<int64_t>();
    range(s, k, static_cast<double>(x), lo, hi);
    out = static_cast<int>(x);
  }
  void operator()(const char* s, const char* k, uint64_t& out, double lo, double hi) const {
    const toml::node* n = find(s, k);
    if (n == nullptr) return;
    if (!n->is_integer()) fail(source, name(s, k) + " must be an integer");
    int64_t x = *n->value<int64_t>();
    range(s, k, static_cast<double>(x), lo, hi);
    out = static_cast<uint64_t>(x);
  }
  void operator()(const char* s, const char* k, double& out, double lo, double hi) const {
    const toml::node* n = find(s, k);
    if (n == nullptr) return;
    if (!n->is_number()) fail(source, name(s, k) + " must be a number");
    double x = *n->value<double>();
    range(s, k, x, lo, hi);
    out = x;
  }
  void operator()(const char* s, const char* k, bool& out, double, double) const {
    const toml::node* n = find(s, k);
    if (n == nullptr) return;
    if (!n->is_boolean()) fail(source, name(s, k) + " must be true or false");
    out = *n->value<bool>();
  }
  void operator()(const char* s, const char* k, std::string& out, double, double) const {
    const toml::node* n = find(s, k);
    if (n == nullptr) return;
    if (!n->is_string()) fail(source, name(s, k) + " must be a string");
    out = *n->value<std::string>();
  }
  void operator()(const char* s, const char* k, IterAdaLNMode& out, double, double) const {
    const toml::node* n = find(s, k);
    if (n == nullptr) return;
    if (!n->is_string()) fail(source, name(s, k) + " must be a string");
    try {
      out = parse_iter_adaln_mode(*n->value<std::string>());
    } catch (const ConfigError& e) {
      fail(source, name(s, k) + ": " + e.what());
    }
  }
};

std::string format_double(double x) {
  std::ostringstream os;
  os.precision(17);
  os << x;
  std::string s = os.str();
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

std::string quote(const std::string& s) {
  std::string out = "\"";
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c == 0x7f) {  // control characters: TOML and JSON both take \uXXXX
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
      continue;
    }
    if (ch == '"' || ch == '\\') out += '\\';
    out += ch;
  }
  return out + "\"";
}

bool is_guard_key(const char* s, const char* k) {
  static const std::set<std::string> keys = {"nonfinite", "loss_spike_factor", "loss_spike_action",
                                             "loss_spike_window"};
  return std::string(s) == "train" && keys.count(k) > 0;
}

bool is_precision_key(const char* s, const char* k) {
  return std::string(s) == "train" && std::string(k) == "precision";
}

struct Printer {
  std::ostringstream& os;
  bool json;
  const char* only_section;  // nullptr: all sections (TOML)
  std::string current;
  bool first = true;
  bool omit_guard = false;      // leave out the numerics-guard keys (all at their defaults)
  bool omit_precision = false;  // leave out train.precision (at its default, "fp32")

  void key(const char* s, const char* k) {
    if (json) {
      os << (first ? "" : ", ") << quote(k) << ": ";
      first = false;
      return;
    }
    if (current != s) {
      os << (current.empty() ? "" : "\n") << "[" << s << "]\n";
      current = s;
    }
    os << k << " = ";
  }
  template <class T>
  void operator()(const char* s, const char* k, T& x, double, double) {
    if (only_section != nullptr && std::string(only_section) != s) return;
    if (omit_guard && is_guard_key(s, k)) return;
    if (omit_precision && is_precision_key(s, k)) return;
    key(s, k);
    if constexpr (std::is_same_v<T, bool>) {
      os << (x ? "true" : "false");
    } else if constexpr (std::is_same_v<T, double>) {
      os << format_double(x);
    } else if constexpr (std::is_same_v<T, std::string>) {
      os << quote(x);
    } else if constexpr (std::is_same_v<T, IterAdaLNMode>) {
      os << quote(to_string(x));
    } else {
      os << x;
    }
    if (!json) os << "\n";
  }
};

}  // namespace

const char* to_string(IterAdaLNMode mode) {
  switch (mode) {
    case IterAdaLNMode::kOff:
      return "off";
    case IterAdaLNMode::kJoint:
      return "joint";
    case IterAdaLNMode::kIter:
      return "iter";
    case IterAdaLNMode::kToken:
      return "token";
  }
  return "?";
}

IterAdaLNMode parse_iter_adaln_mode(const std::string& name) {
  if (name == "off") return IterAdaLNMode::kOff;
  if (name == "joint") return IterAdaLNMode::kJoint;
  if (name == "iter") return IterAdaLNMode::kIter;
  if (name == "token") return IterAdaLNMode::kToken;
  throw ConfigError("unknown IterAdaLN mode '" + name + "' (expected off, joint, iter or token)");
}

Config parse_config(const std::string& text, const std::string& source) {
  const toml::table root = parse_toml(text, source);
  // Reject anything we would silently ignore: a typo must not train the wrong model.
  Config config;
  std::set<std::string> known;
  visit_fields(config, [&](const char* s, const char* k, auto&, double, double) {
    known.insert(std::string(s) + "." + k);
    known.insert(s);
  });
  for (auto&& [section, node] : root) {
    std::string sec(section.str());
    // A job file is a training config plus [job] for `loopmoe submit`, which checks that table
    // itself (docs/SERVICE.md); the same file trains locally too.
    if (sec == "job") continue;
    if (!known.count(sec)) fail(source, "unknown section [" + sec + "]");
    if (!node.is_table()) fail(source, "[" + sec + "] must be a table");
    for (auto&& [key, value] : *node.as_table()) {
      std::string full = sec + "." + std::string(key.str());
      if (!known.count(full)) fail(source, "unknown key " + full);
      (void)value;
    }
  }
  visit_fields(config, Reader{root, source});
  try {
    validate(config);
  } catch (const ConfigError& e) {
    fail(source, e.what());
  }
  return config;
}

Config load_config(const std::string& path) {
  return parse_config(common::read_text_as<ConfigError>(path), path);
}

void validate(const Config& c) {
  const ModelConfig& m = c.model;
  if (m.top_k > m.n_experts) {
    throw ConfigError("model.top_k = " + std::to_string(m.top_k) +
                      " exceeds model.n_experts = " + std::to_string(m.n_experts));
  }
  if (m.head_dim % 2 != 0) throw ConfigError("model.head_dim must be even (rotary embedding)");
  if (m.adaln() && m.cond_dim % 2 != 0) {
    throw ConfigError("model.cond_dim must be even (sinusoidal iteration encoding)");
  }
  if (c.train.warmup_steps > c.train.steps) {
    throw ConfigError("train.warmup_steps exceeds train.steps");
  }
  const TrainConfig& t = c.train;
  if (t.nonfinite != "stop" && t.nonfinite != "skip" && t.nonfinite != "rollback") {
    throw ConfigError("train.nonfinite = '" + t.nonfinite + "' (expected stop, skip or rollback)");
  }
  if (t.loss_spike_action != "warn" && t.loss_spike_action != "stop") {
    throw ConfigError("train.loss_spike_action = '" + t.loss_spike_action +
                      "' (expected warn or stop)");
  }
  if (t.loss_spike_factor != 0 && t.loss_spike_factor <= 1) {
    throw ConfigError("train.loss_spike_factor must be 0 (off) or greater than 1");
  }
  if (t.precision != "fp32" && t.precision != "bf16") {
    throw ConfigError("train.precision = '" + t.precision + "' (expected fp32 or bf16)");
  }
}

bool numerics_guard_is_default(const TrainConfig& train) {
  const TrainConfig d;
  return train.nonfinite == d.nonfinite && train.loss_spike_factor == d.loss_spike_factor &&
         train.loss_spike_action == d.loss_spike_action &&
         train.loss_spike_window == d.loss_spike_window;
}

bool precision_is_default(const TrainConfig& train) {
  return train.precision == TrainConfig().precision;
}

std::vector<std::string> config_keys() {
  std::vector<std::string> keys;
  Config c;
  visit_fields(c, [&](const char* s, const char* k, auto&, double, double) {
    keys.push_back(std::string(s) + "." + k);
  });
  return keys;
}

std::string to_toml(const Config& config) {
  std::ostringstream os;
  Config copy = config;
  visit_fields(copy, Printer{os, false, nullptr, "", true, numerics_guard_is_default(config.train),
                             precision_is_default(config.train)});
  return os.str();
}

std::string model_to_json(const ModelConfig& model) {
  std::ostringstream os;
  Config copy;
  copy.model = model;
  os << "{";
  visit_fields(copy, Printer{os, true, "model", "", true});
  os << "}";
  return os.str();
}

std::string train_to_json(const TrainConfig& train) {
  std::ostringstream os;
  Config copy;
  copy.train = train;
  os << "{";
  visit_fields(copy, Printer{os, true, "train", "", true, numerics_guard_is_default(train),
                             precision_is_default(train)});
  os << "}";
  return os.str();
}

}  // namespace loopmoe::model
