// The model: parameters, the forward and backward passes over layer applications, as calls of
// ops.h kernels on Buffer activations (buffer.h).
#include "model/model.h"

#include <cblas.h>
#include <malloc.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "model/local_dispatcher.h"
#include "model/ops.h"
#include "model/rng.h"

namespace loopmoe::model {
namespace {
constexpr const ops::GradGroups<float>* kNoBias = nullptr;
}  // namespace

void set_num_threads(int threads) {
  omp_set_num_threads(std::max(1, threads));
  openblas_set_num_threads(1);
  // Activation buffers are megabytes and re-created every step; keep freed memory in the heap
  // instead of returning it to the kernel, which costs a page fault per 4 KiB on every step.
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
}

Model::Model(const ModelConfig& config)
    : config_(config),
      layout_(config),
      device_(default_device()),
      params_(layout_.size(), device_),
      grads_(layout_.size(), device_),
      moe_(config),
      group_grads_(device_) {
  for (const LayerOffsets& l : layout_.layers) {
    attn_norms_.emplace_back(config_, l.attn_norm);
    ffn_norms_.emplace_back(config_, l.ffn_norm);
  }
  local_dispatcher_ =
      std::make_unique<LocalDispatcher>(config_, layout_, params_.data(), grads_.data());
  dispatcher_ = local_dispatcher_.get();
  for (const ParamTensor& t : layout_.tensors()) {
    if (is_expert_tensor(t)) continue;
    if (!replica_ranges_.empty() &&
        replica_ranges_.back().first + replica_ranges_.back().second == t.offset) {
      replica_ranges_.back().second += t.numel();
    } else {
      replica_ranges_.emplace_back(t.offset, t.numel());
    }
  }
}

Model::~Model() = default;

void Model::set_dispatcher(Dispatcher* d) { dispatcher_ = d ? d : local_dispatcher_.get(); }

void Model::check_device(const char* what) const {
  const Device current = default_device();
  if (current != device_) {
    throw std::logic_error(std::string("Model::") + what + ": the model lives on " +
                           to_string(device_) + " but the default device is now " +
                           to_string(current) + " (a model stays on the device it was built on)");
  }
}

void Model::load_params(const float* values, size_t n) {
  check_device("load_params");
  if (n != params_.size()) throw std::invalid_argument("Model::load_params: wrong parameter count");
  params_.copy_from_host(0, values, n);
}

void Model::zero_grad() {
  check_device("zero_grad");
  if (!remote_experts_) {
    grads_.zero_all();
    return;
  }
  for (const auto& [offset, n] : replica_ranges_) grads_.zero(offset, n);
}

bool is_expert_tensor(const ParamTensor& t) {
  return t.name.ends_with(".moe.w1") || t.name.ends_with(".moe.w3") || t.name.ends_with(".moe.w2");
}

void visit_initial_params(const ModelConfig& config, const ParamLayout& layout, uint64_t seed,
                          const std::function<bool(const ParamTensor&)>& want,
                          const std::function<void(const ParamTensor&, const float*)>& visit) {
  Rng rng(seed);
  const double std = config.init_std;
  const double out_std = std / std::sqrt(2.0 * config.depth());
  std::vector<float> values;
  for (const ParamTensor& t : layout.tensors()) {
    const std::string& n = t.name;
    double s = 0, fill = 0;
    if (n.ends_with(".weight")) {
      fill = 1;
    } else if (n.ends_with("iter_b1") || n.ends_with("iter_b2") || n.ends_with("mod_w") ||
               n.ends_with("mod_b")) {
      fill = 0;
    } else if (n.ends_with("attn.wo") || n.ends_with("moe.w2")) {
      s = out_std;
    } else {
      s = std;
    }
    const bool keep = want(t);
    if (keep) values.resize(t.numel());
    for (size_t i = 0; i < t.numel(); ++i) {
      const float v = s > 0 ? static_cast<float>(s * rng.normal()) : static_cast<float>(fill);
      if (keep) values[i] = v;
    }
    if (keep) visit(t, values.data());
  }
}

void Model::init_params(uint64_t seed) {
  check_device("init_params");
  visit_initial_params(
      config_, layout_, seed,
      [&](const ParamTensor& t) { return !(remote_experts_ && is_expert_tensor(t)); },
      [&](const ParamTensor& t, const float* v) {
        params_.copy_from_host(t.offset, v, t.numel());
      });
}

Buffer<float> Model::attention_scratch(int T, int per_thread) const {
  if (device_ == Device::kCuda) return Buffer<float>();
  return Buffer<float>(static_cast<size_t>(omp_get_max_threads()) * per_thread * T * T);
}

void Model::attention_forward(Application& a, int layer, int B, int T) {
  const LayerOffsets& l = layout_.layers[layer];
  const int S = B * T, D = config_.d_model, H = config_.n_heads, hd = config_.head_dim;
  const int I = H * hd;
  const float* p = params_.data();
  a.qkv.resize(static_cast<size_t>(S) * 3 * I);
  a.lse.resize(static_cast<size_t>(B) * H * T);
  a.o.resize(static_cast<size_t>(S) * I);
  a.attn_y.resize(static_cast<size_t>(S) * D);
  {
    ops::FlopKindScope kind(ops::FlopKind::kAttentionProj);
    ops::matmul_forward(a.qkv.data(), a.attn_norm.u.data(), p + l.wqkv,
                        static_cast<const float*>(nullptr), S, D, 3 * I);
  }
  ops::rope_forward(a.qkv.data(), rope_cos_.data(), rope_sin_.data(), B, T, H, hd);
  {
    ops::FlopKindScope kind(ops::FlopKind::kAttentionScores);
    Buffer<float> scratch = attention_scratch(T, 1);
    ops::attention_forward(a.o.data(), a.lse.data(), scratch.data(), a.qkv.data(), B, T, H, hd);
  }
  ops::FlopKindScope kind(ops::FlopKind::kAttentionProj);
  ops::matmul_forward(a.attn_y.data(), a.o.data(), p + l.wo, static_cast<const float*>(nullptr), S,
                      I, D);
}

void Model::attention_backward(Application& a, int layer, const float* dy, float* du,
                               const ops::GradGroups<float>& gg, int B, int T) {
  const LayerOffsets& l = layout_.layers[layer];
  const int S = B * T, D = config_.d_model, H = config_.n_heads, hd = config_.head_dim;
  const int I = H * hd;
  const float* p = params_.data();
  Buffer<float> d_o(static_cast<size_t>(S) * I);
  Buffer<float> dqkv(static_cast<size_t>(S) * 3 * I);
  Buffer<float> scratch = attention_scratch(T, 2);
  {
    ops::FlopKindScope kind(ops::FlopKind::kAttentionProj);
    ops::matmul_backward(d_o.data(), gg.shifted(l.wo), kNoBias, dy, a.o.data(), p + l.wo, I, D);
  }
  {
    ops::FlopKindScope kind(ops::FlopKind::kAttentionScores);
    ops::attention_backward(dqkv.data(), scratch.data(), d_o.data(), a.qkv.data(), a.o.data(),
                            a.lse.data(), B, T, H, hd);
  }
  ops::rope_backward(dqkv.data(), rope_cos_.data(), rope_sin_.data(), B, T, H, hd);
  ops::FlopKindScope kind(ops::FlopKind::kAttentionProj);
  ops::matmul_backward(du, gg.shifted(l.wqkv), kNoBias, dqkv.data(), a.attn_norm.u.data(),
                       p + l.wqkv, D, 3 * I);
}

LossParts Model::forward(const int32_t* tokens, const int32_t* targets, int B, int T, int loops) {
  ForwardOptions options;
  options.loops = loops;
  return forward(tokens, targets, B, T, options);
}

const float* Model::iteration_state(int r) const {
  check_device("iteration_state");
  const size_t index = 2 * static_cast<size_t>(config_.n_layers) * (r + 1);
  if (r < 0 || index >= resid_.size()) throw std::out_of_range("iteration_state: no iteration r");
  return resid_[index].data();
}

const RoutingPlan& Model::routing(int application) {
  MoeActivations& moe = apps_.at(application).moe;
  routing_to_host(moe.plan, moe.router, /*slots=*/true);
  return moe.plan;
}

std::vector<float> Model::logits_to_host() const {
  check_logits("logits_to_host");
  return copy_to_host(logits_);
}

const std::vector<float>& Model::logits() const {
  check_logits("logits");
  return logits_.host_vector();
}

void Model::check_logits(const char* what) const {
  if (logits_gone_) {
    throw std::logic_error(std::string("Model::") + what +
                           ": the last forward had targets and computed its softmax over the "
                           "logits; call set_keep_logits(true) before it to keep them");
  }
}

std::vector<float> Model::iteration_state_to_host(int r) const {
  iteration_state(r);  // the checks
  return copy_to_host(resid_[2 * static_cast<size_t>(config_.n_layers) * (r + 1)]);
}

double Model::decode_loss(const float* x, const int32_t* targets, int S) const {
  check_device("decode_loss");
  const int D = config_.d_model, V = config_.vocab_size;
  const float* p = params_.data();
  Buffer<int32_t> device_targets;  // the kernels read device memory
  copy_from_host(device_targets, targets, S);
  Buffer<float> h(static_cast<size_t>(S) * D), rstd(S);
  Buffer<float> logits(static_cast<size_t>(S) * V);
  ops::rmsnorm_forward(h.data(), rstd.data(), x, p + layout_.final_norm, S, D);
  if (config_.tie_embeddings) {
    ops::gemm<float>(false, true, S, V, D, 1.f, h.data(), D, p + layout_.tok_emb, D, 0.f,
                     logits.data(), V);
  } else {
    ops::matmul_forward(logits.data(), h.data(), p + layout_.lm_head,
                        static_cast<const float*>(nullptr), S, D, V);
  }
  // The same fixed-point sum as forward(), so a logit-lens loss equals the validation loss exactly
  // (the softmax in place, as there).
  return ops::crossentropy_forward_sum(logits.data(), logits.data(), device_targets.data(), S, V)
             .value() /
         S;
}

LossParts Model::forward(const int32_t* tokens, const int32_t* targets, int B, int T,
                         const ForwardOptions& options) {
  check_device("forward");
  if (remote_experts_ && dispatcher_ == local_dispatcher_.get()) {
    throw std::logic_error("Model::forward: the experts are remote but no dispatcher is set");
  }
  const int S = B * T, D = config_.d_model, V = config_.vocab_size, N = config_.n_layers;
  const int R = options.loops < 0 ? config_.n_loops : options.loops;
  const bool halting = options.halt_threshold > 0;
  halted_forward_ = halting;
  iterations_used_.assign(S, R);
  // Per token: 0 while it runs, else the iterations it ran before halting; its frozen state.
  Buffer<int32_t> halted_at(halting ? S : 0);
  Buffer<float> frozen(halting ? static_cast<size_t>(S) * D : 0);
  // Frozen tokens get their state back after every sublayer of the remaining iterations.
  auto hold_halted = [&](Buffer<float>& x) {
    if (halting) ops::copy_masked_rows(x.data(), frozen.data(), halted_at.data(), S, D);
  };
  const int A = N * R;
  B_ = B;
  T_ = T;
  copy_from_host(tokens_copy_, tokens, S);
  tokens_ = tokens_copy_.data();
  if (targets != nullptr) {
    copy_from_host(targets_, targets, S);
  } else {
    targets_.clear();
  }
  if (rope_len_ != T) {
    const int half = config_.head_dim / 2;
    rope_cos_.resize(static_cast<size_t>(T) * half);
    rope_sin_.resize(static_cast<size_t>(T) * half);
    ops::rope_tables(rope_cos_.data(), rope_sin_.data(), T, config_.head_dim, config_.rope_theta);
    rope_len_ = T;
  }
  apps_.resize(A);
  resid_.resize(2 * A + 1);
  for (auto& r : resid_) r.resize(static_cast<size_t>(S) * D);
  const float* p = params_.data();

  ops::embedding_forward(resid_[0].data(), tokens_, p + layout_.tok_emb, S, D);
  LossParts loss;
  for (int a = 0; a < A; ++a) {
    const int r = a / N, n = a % N;
    Application& app = apps_[a];
    // Attention sublayer: resid[2a] → resid[2a+1].
    attn_norms_[n].forward(app.attn_norm, p, resid_[2 * a].data(), r, S);
    attention_forward(app, n, B, T);
    resid_[2 * a + 1] = resid_[2 * a];
    ops::gated_residual_forward(resid_[2 * a + 1].data(), app.attn_y.data(),
                                attn_norms_[n].gate_source(app.attn_norm), S, D);
    hold_halted(resid_[2 * a + 1]);
    // MoE sublayer: resid[2a+1] → resid[2a+2].
    ffn_norms_[n].forward(app.ffn_norm, p, resid_[2 * a + 1].data(), r, S);
    app.moe_y.resize(static_cast<size_t>(S) * D);
    moe_.forward(app.moe, *dispatcher_, a, n, p + layout_.layers[n].router, app.ffn_norm.u.data(),
                 app.moe_y.data(), S);
    resid_[2 * a + 2] = resid_[2 * a + 1];
    ops::gated_residual_forward(resid_[2 * a + 2].data(), app.moe_y.data(),
                                ffn_norms_[n].gate_source(app.ffn_norm), S, D);
    hold_halted(resid_[2 * a + 2]);
    if (halting && n == N - 1) {  // end of iteration r: which tokens have converged?
      ops::halt_converged_rows(halted_at.data(), frozen.data(), resid_[2 * a + 2 - 2 * N].data(),
                               resid_[2 * a + 2].data(), S, D, options.halt_threshold, r + 1);
    }
  }
  // The routings' summaries reach the host here, once per step, not in every layer.
  for (Application& app : apps_) {
    routing_to_host(app.moe.plan, app.moe.router, /*slots=*/false);
    loss.aux += app.moe.plan.aux_loss / A;
    loss.z += app.moe.plan.z_loss / A;
    loss.dropped += app.moe.plan.dropped;
  }
  if (halting) {
    const std::vector<int32_t> ran = copy_to_host(halted_at);
    for (int t = 0; t < S; ++t) {
      if (ran[t] > 0) iterations_used_[t] = ran[t];
    }
  }
  final_rstd_.resize(S);
  final_h_.resize(static_cast<size_t>(S) * D);
  ops::rmsnorm_forward(final_h_.data(), final_rstd_.data(), resid_[2 * A].data(),
                       p + layout_.final_norm, S, D);
  logits_.resize(static_cast<size_t>(S) * V);
  ops::FlopKindScope head_kind(ops::FlopKind::kHead);
  if (config_.tie_embeddings) {
    ops::gemm<float>(false, true, S, V, D, 1.f, final_h_.data(), D, p + layout_.tok_emb, D, 0.f,
                     logits_.data(), V);
  } else {
    ops::matmul_forward(logits_.data(), final_h_.data(), p + layout_.lm_head,
                        static_cast<const float*>(nullptr), S, D, V);
  }
  logits_gone_ = false;
  has_targets_ = targets != nullptr;
  if (targets != nullptr) {
    if (keep_logits_) {
      probs_.resize(logits_.size());
    } else {
      probs_ = Buffer<float>(0, device_);  // the softmax goes over the logits (set_keep_logits)
      logits_gone_ = true;
    }
    loss.ce_sum =
        ops::crossentropy_forward_sum(head_probs(), logits_.data(), targets_.data(), S, V);
    loss.ce = loss.ce_sum.value() / static_cast<double>(loss_tokens_ > 0 ? loss_tokens_ : S);
  }
  loss.total = loss.ce + config_.aux_loss_coef * loss.aux + config_.z_loss_coef * loss.z;
  return loss;
}

void Model::backward() {
  check_device("backward");
  if (halted_forward_) throw std::logic_error("backward() after a forward with adaptive halting");
  if (!has_targets_) throw std::logic_error("backward() after a forward without targets");
  const int B = B_, T = T_, S = B * T, D = config_.d_model, V = config_.vocab_size;
  const int N = config_.n_layers, A = static_cast<int>(apps_.size());
  const float* p = params_.data();
  // Every weight gradient but the experts' goes to the row groups (the dispatcher accumulates the
  // experts' into grads_ directly); with one group that is grads_ itself.
  const int G = std::min(grad_groups_, B);
  ops::GradGroups<float> gg = ops::GradGroups<float>::single(grads_.data(), S);
  if (G > 1) {
    const size_t size = static_cast<size_t>(G) * layout_.size();
    // A fresh buffer rather than resize(), which would copy (and so commit) the old one: the
    // pages of expert ranges are never touched, so never committed.
    if (group_grads_.size() < size) group_grads_ = FlatBuffer(size, device_);
    gg = {group_grads_.data(), layout_.size(), G, B, T};
    for (int grp = 0; grp < G; ++grp) {
      for (const auto& [offset, n] : replica_ranges_) {
        group_grads_.zero(static_cast<size_t>(grp) * layout_.size() + offset, n);
      }
    }
  }
  // Loss head: dlogits overwrite the saved softmax.
  const float ce_scale = 1.f / static_cast<float>(loss_tokens_ > 0 ? loss_tokens_ : S);
  float* probs = head_probs();
  ops::crossentropy_backward(probs, probs, targets_.data(), ce_scale, S, V);
  Buffer<float> dh(static_cast<size_t>(S) * D);
  {
    ops::FlopKindScope head_kind(ops::FlopKind::kHead);
    if (config_.tie_embeddings) {
      ops::gemm<float>(false, false, S, D, V, 1.f, probs, V, p + layout_.tok_emb, D, 0.f, dh.data(),
                       D);
      for (int grp = 0; grp < gg.groups; ++grp) {
        const int r0 = gg.row_begin(grp), rows = gg.row_end(grp) - r0;
        ops::gemm<float>(true, false, V, D, rows, 1.f, probs + static_cast<size_t>(r0) * V, V,
                         final_h_.data() + static_cast<size_t>(r0) * D, D, 1.f,
                         gg.at(grp) + layout_.tok_emb, D);
      }
    } else {
      ops::matmul_backward(dh.data(), gg.shifted(layout_.lm_head), kNoBias, probs, final_h_.data(),
                           p + layout_.lm_head, D, V);
    }
  }
  Buffer<float> dx(static_cast<size_t>(S) * D);
  ops::rmsnorm_backward(dx.data(), static_cast<float*>(nullptr), dh.data(), resid_[2 * A].data(),
                        p + layout_.final_norm, final_rstd_.data(), S, D);
  ops::rmsnorm_weight_backward(gg.shifted(layout_.final_norm), dh.data(), resid_[2 * A].data(),
                               final_rstd_.data(), D);

  const double aux_scale = config_.aux_loss_coef / A, z_scale = config_.z_loss_coef / A;
  Buffer<float> dy(static_cast<size_t>(S) * D), du(static_cast<size_t>(S) * D);
  Buffer<float> dm(config_.adaln() ? static_cast<size_t>(S) * 3 * D : 0);
  for (int a = A - 1; a >= 0; --a) {
    const int n = a % N;
    Application& app = apps_[a];
    // MoE sublayer.
    ops::gated_residual_backward(dy.data(), dm.data(), dx.data(), app.moe_y.data(),
                                 ffn_norms_[n].gate_source(app.ffn_norm), S, D);
    du.set_zero();
    moe_.backward(du.data(), gg.shifted(layout_.layers[n].router), *dispatcher_, a, n, app.moe,
                  p + layout_.layers[n].router, app.ffn_norm.u.data(), dy.data(), aux_scale,
                  z_scale);
    ffn_norms_[n].backward(dx.data(), gg, du.data(), dm.data(), app.ffn_norm, p,
                           resid_[2 * a + 1].data());
    // Attention sublayer.
    ops::gated_residual_backward(dy.data(), dm.data(), dx.data(), app.attn_y.data(),
                                 attn_norms_[n].gate_source(app.attn_norm), S, D);
    du.set_zero();
    attention_backward(app, n, dy.data(), du.data(), gg, B, T);
    attn_norms_[n].backward(dx.data(), gg, du.data(), dm.data(), app.attn_norm, p,
                            resid_[2 * a].data());
  }
  ops::embedding_backward(gg.shifted(layout_.tok_emb), dx.data(), tokens_, D);
  if (G > 1) {
    ops::tree_sum_groups(gg.base, gg.stride, G, replica_ranges_);
    float* g = grads_.data();
    for (const auto& [offset, n] : replica_ranges_)
      ops::add_inplace(g + offset, gg.base + offset, n);
  }
}

}  // namespace loopmoe::model
