// Configuration of a LoopMoE / Vanilla MoE model and its training run (docs/CONFIG.md).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace loopmoe::model {

enum class IterAdaLNMode { kOff, kJoint, kIter, kToken };

const char* to_string(IterAdaLNMode mode);
IterAdaLNMode parse_iter_adaln_mode(const std::string& name);  // throws ConfigError

struct ModelConfig {
  int vocab_size = 4096;
  int seq_len = 128;
  int d_model = 128;
  int n_heads = 4;
  int head_dim = 32;
  int n_layers = 8;  // unique layers N
  int n_loops = 1;   // loop count R; effective depth N*R
  int n_experts = 8;
  int top_k = 2;
  int expert_hidden = 128;
  IterAdaLNMode iter_adaln = IterAdaLNMode::kOff;
  int cond_dim = 32;
  bool tie_embeddings = true;
  bool renormalize = true;
  double capacity_factor = 0.0;  // 0 = dropless
  double aux_loss_coef = 0.01;
  double z_loss_coef = 0.001;
  double rope_theta = 10000.0;
  double init_std = 0.02;

  int attn_inner() const { return n_heads * head_dim; }
  int depth() const { return n_layers * n_loops; }
  bool adaln() const { return iter_adaln != IterAdaLNMode::kOff; }
  bool adaln_iter_term() const {
    return iter_adaln == IterAdaLNMode::kJoint || iter_adaln == IterAdaLNMode::kIter;
  }
  bool adaln_token_term() const {
    return iter_adaln == IterAdaLNMode::kJoint || iter_adaln == IterAdaLNMode::kToken;
  }
};

struct TrainConfig {
  int batch_size = 16;
  int steps = 1000;
  double lr = 3e-3;
  double min_lr_ratio = 0.1;
  int warmup_steps = 50;
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double grad_clip = 1.0;
  uint64_t seed = 1234;
  int eval_interval = 100;
  int eval_batches = 8;
  int checkpoint_interval = 250;
  int log_interval = 10;
  // Sequence groups whose weight gradients are summed in a fixed tree (Model::set_grad_groups):
  // data-parallel runs whose worker count is a power of two dividing it match one process exactly.
  int grad_groups = 8;
  // Numerics guard (docs/CONFIG.md). A step whose loss or global gradient norm is NaN or Inf never
  // reaches AdamW; then "stop" ends the run with an error, "skip" drops the step (parameters and
  // AdamW state stay as they were) and goes on, "rollback" restarts from the last checkpoint.
  std::string nonfinite = "stop";
  // A step whose loss exceeds loss_spike_factor × the median of the last loss_spike_window losses
  // is a spike; loss_spike_action "warn" logs it, "stop" ends the run. 0: no spike check.
  double loss_spike_factor = 0;
  std::string loss_spike_action = "warn";
  int loss_spike_window = 50;
  // Matrix products: "fp32", or "bf16" (operands rounded to bfloat16, fp32 accumulation; weights,
  // optimizer state, norms, softmax and losses stay fp32): ops::MatmulPrecision, docs/CONFIG.md.
  std::string precision = "fp32";
};

// Whether every numerics-guard key of `train` has its default (the canonical TOML text then
// leaves them out, so that runs without a guard keep their checkpoints' config text and hash).
bool numerics_guard_is_default(const TrainConfig& train);
// The same for train.precision: left out of the canonical text while it is "fp32".
bool precision_is_default(const TrainConfig& train);

struct DataConfig {
  std::string dir = "data/sotu";
};

struct Config {
  ModelConfig model;
  TrainConfig train;
  DataConfig data;
};

// Reads a TOML config. Unknown sections or keys, wrong types and out-of-range values raise
// ConfigError naming the file and the key.
Config load_config(const std::string& path);
Config parse_config(const std::string& toml_text, const std::string& source_name);
// Checks cross-field constraints (e.g. top_k <= n_experts, even head_dim); throws ConfigError.
void validate(const Config& config);
// "section.key" of every config field, in file order.
std::vector<std::string> config_keys();
// Canonical TOML text of every field (what checkpoints store and hash).
std::string to_toml(const Config& config);
// Canonical JSON objects of the [model] / [train] sections (used by the parity dump).
std::string model_to_json(const ModelConfig& model);
std::string train_to_json(const TrainConfig& train);

}  // namespace loopmoe::model
