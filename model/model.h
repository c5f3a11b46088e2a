// LoopMoE and Vanilla MoE in one code path: N unique layers applied R times (Vanilla: R = 1,
// IterAdaLN off). One contiguous parameter buffer and one gradient buffer (docs/MODEL.md layout).
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "model/buffer.h"
#include "model/config.h"
#include "model/dispatcher.h"
#include "model/flat_buffer.h"
#include "model/iter_adaln.h"
#include "model/moe_layer.h"
#include "model/ops.h"
#include "model/param_layout.h"
#include "model/zero_page_allocator.h"

namespace loopmoe::model {

struct LossParts {
  double total = 0;     // ce + aux_coef·aux + z_coef·z
  double ce = 0;        // ce_sum / tokens (the loss token count when set, else this call's rows)
  ops::LossSum ce_sum;  // this call's rows' cross-entropy, summed split-invariantly
  double aux = 0;       // mean over MoE layer applications
  double z = 0;         // mean over MoE layer applications
  int64_t dropped = 0;
};

struct ForwardOptions {
  int loops = -1;             // < 0: the configured R
  double halt_threshold = 0;  // > 0: per-token adaptive halting (inference only; see forward)
};

// A Model lives on one device: default_device() when it is built (buffer.h). Its parameters,
// gradients and activations are there; params(), grads() and iteration_state() are pointers into
// that device's memory, and the host reaches them only through the copies below. Its entry points
// throw std::logic_error when the default device has changed since (the kernels would run on the
// wrong device's pointers).
class Model {
 public:
  explicit Model(const ModelConfig& config);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return config_; }
  const ParamLayout& layout() const { return layout_; }
  size_t num_params() const { return layout_.size(); }
  Device device() const { return device_; }
  float* params() { return params_.data(); }
  const float* params() const { return params_.data(); }
  float* grads() { return grads_.data(); }
  // The flat arrays themselves (host views and copies for checkpoints and tests).
  const FlatBuffer& param_buffer() const { return params_; }
  const FlatBuffer& grad_buffer() const { return grads_; }
  std::vector<float> params_to_host() const { return params_.to_host(); }
  std::vector<float> grads_to_host() const { return grads_.to_host(); }
  // Parameters [num_params()] from host memory (a loaded checkpoint), on any device.
  void load_params(const float* values, size_t n);
  // Throws std::logic_error unless default_device() is this model's device.
  void check_device(const char* what) const;

  // Fills parameters per docs/MODEL.md "Initialisation" from `seed` (bit-reproducible).
  void init_params(uint64_t seed);
  void zero_grad();
  // The experts live elsewhere (the expert shards of the distributed service): init_params and
  // zero_grad leave their tensors untouched (zero, and never committed to memory: the buffers
  // are ZeroPageVectors), and forward() refuses to run them through the local dispatcher. Call
  // before init_params.
  void set_remote_experts(bool remote) { remote_experts_ = remote; }

  // Experts run through `dispatcher` (default: a LocalDispatcher over this model's buffers).
  void set_dispatcher(Dispatcher* dispatcher);
  // Tokens the cross-entropy mean is taken over; <= 0 (default): the forward's own B*T. A worker
  // of the distributed service holds a slice of the global batch and sets the global count, so
  // that the workers' losses and gradients add up to the single-process ones.
  void set_loss_token_count(int64_t tokens) { loss_tokens_ = tokens; }
  // Weight gradients of everything but the experts are accumulated per group of whole sequences
  // and the groups summed in a fixed pairwise tree (ops::GradGroups; docs/MODEL.md "Gradient
  // reduction"), at most one group per sequence. 1: one accumulation over the whole batch.
  void set_grad_groups(int groups) { grad_groups_ = std::max(1, groups); }
  int grad_groups() const { return grad_groups_; }
  // [offset, length) runs of the parameter buffer that are not expert weights (what workers of
  // the distributed service replicate), in layout order.
  const std::vector<std::pair<size_t, size_t>>& replica_ranges() const { return replica_ranges_; }

  // tokens/targets [B*T]. targets == nullptr: logits only (loss parts other than aux/z are 0).
  // loops < 0: the configured R. Activations are kept for backward().
  LossParts forward(const int32_t* tokens, const int32_t* targets, int B, int T, int loops = -1);
  // With halt_threshold > 0, after every iteration r a token whose residual stream changed by less
  // than that fraction (‖x_r − x_{r−1}‖ / ‖x_{r−1}‖) stops iterating: its state is frozen for
  // the remaining iterations (other tokens still attend to it). No backward() afterwards.
  LossParts forward(const int32_t* tokens, const int32_t* targets, int B, int T,
                    const ForwardOptions& options);
  // Per token of the last forward: iterations it ran (R unless it halted).
  const std::vector<int>& iterations_used() const { return iterations_used_; }
  // Residual stream [B*T, D] after iteration r of the last forward (logit lens input), in the
  // activations' storage: device memory, to hand back to decode_loss or copy with
  // iteration_state_to_host.
  const float* iteration_state(int r) const;
  std::vector<float> iteration_state_to_host(int r) const;
  // Mean cross-entropy of decoding hidden states x[S, D] (device memory, as iteration_state
  // returns) with the final norm and the LM head; targets: host.
  double decode_loss(const float* x, const int32_t* targets, int S) const;
  // Accumulates the gradient of the last forward's total loss into grads().
  void backward();

  // The LM head's cross-entropy runs in place: a forward with targets turns the logits into their
  // softmax (and backward() that into dlogits), so the head needs one [B*T, V] buffer, not two
  // (2 GiB each at configs/gpu_small_*.toml's 16 × 1024 tokens and 32768 words). With
  // set_keep_logits(true) the softmax goes to a buffer of its own and the logits stay, for whoever
  // reads them after such a forward (parity dumps, tests). The numbers are the same either way.
  void set_keep_logits(bool keep) { keep_logits_ = keep; }
  // Logits [B*T, V] of the last forward, copied to the host (wherever the activations live).
  // std::logic_error after a forward with targets that did not keep them (set_keep_logits).
  std::vector<float> logits_to_host() const;
  // The same as a view of the activation buffer itself, no copy: a CPU model only; throws
  // std::logic_error on a device, where callers must use logits_to_host(), or when they are gone.
  const std::vector<float>& logits() const;
  int applications() const { return static_cast<int>(apps_.size()); }
  // Routing of MoE layer application a = r*N + n in the last forward, every field on the host
  // (the first call per forward copies the slots there).
  const RoutingPlan& routing(int application);

 private:
  struct Application {
    NormActivations attn_norm, ffn_norm;
    Buffer<float> qkv, lse, o, attn_y;  // attention sublayer (lse: ops.h attention_forward)
    MoeActivations moe;
    Buffer<float> moe_y;
  };
  void attention_forward(Application& a, int layer, int B, int T);
  // The CPU kernels' temporaries of attention_forward/backward (`per_thread` T×T blocks per
  // thread); empty on CUDA, whose kernels keep theirs on chip or in the backend's workspace.
  Buffer<float> attention_scratch(int T, int per_thread) const;
  void attention_backward(Application& a, int layer, const float* dy, float* du,
                          const ops::GradGroups<float>& grads, int B, int T);

  ModelConfig config_;
  ParamLayout layout_;
  Device device_;  // default_device() at construction; see check_device
  // Parameters and gradients: one contiguous array each on the model's device, in layout order.
  FlatBuffer params_, grads_;
  std::vector<NormBlock> attn_norms_, ffn_norms_;
  MoeLayer moe_;
  std::unique_ptr<Dispatcher> local_dispatcher_;
  Dispatcher* dispatcher_ = nullptr;
  Buffer<float> rope_cos_, rope_sin_;
  int rope_len_ = 0;

  // Activations of the last forward (Buffers: on the backend's device; see buffer.h).
  int B_ = 0, T_ = 0;
  const int32_t* tokens_ = nullptr;  // tokens_copy_.data()
  Buffer<int32_t> targets_;
  std::vector<Application> apps_;
  std::vector<Buffer<float>> resid_;  // residual stream before each sublayer, and final
  Buffer<float> final_rstd_, final_h_, logits_;
  Buffer<float> probs_;  // the head's softmax, then dlogits, when keep_logits_ (else in logits_)
  float* head_probs() { return logits_gone_ ? logits_.data() : probs_.data(); }
  void check_logits(const char* what) const;
  bool keep_logits_ = false;
  bool logits_gone_ = false;  // the last forward's softmax overwrote logits_
  bool has_targets_ = false;  // the last forward had targets (backward() needs them)
  Buffer<int32_t> tokens_copy_;
  std::vector<int> iterations_used_;  // host
  bool halted_forward_ = false;
  int64_t loss_tokens_ = 0;
  int grad_groups_ = 1;
  bool remote_experts_ = false;
  std::vector<std::pair<size_t, size_t>> replica_ranges_;
  FlatBuffer group_grads_;  // [groups][num_params]; only replica ranges touched
};

// The initial parameter values of init_params, tensor by tensor in layout order: visit(tensor,
// values) for every tensor `want` accepts (values: its numel() floats); the random draws of the
// others are made and dropped, so every value equals init_params's. One tensor in memory at a
// time: an expert shard initialises its experts without materialising the model.
void visit_initial_params(const ModelConfig& config, const ParamLayout& layout, uint64_t seed,
                          const std::function<bool(const ParamTensor&)>& want,
                          const std::function<void(const ParamTensor&, const float*)>& visit);
// Whether a tensor holds expert weights (w1, w3, w2 of a layer's experts).
bool is_expert_tensor(const ParamTensor& tensor);

// Sets the OpenMP thread count and keeps OpenBLAS single-threaded inside our parallel regions.
void set_num_threads(int threads);

}  // namespace loopmoe::model
