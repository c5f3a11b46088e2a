#include "model/param_layout.h"

#include <stdexcept>

namespace loopmoe::model {

size_t ParamTensor::numel() const {
  size_t n = 1;
  for (int s : shape) n *= static_cast<size_t>(s);
  return n;
}

size_t ParamLayout::add(const std::string& name, std::vector<int> shape) {
  ParamTensor t{name, total_, std::move(shape)};
  total_ += t.numel();
  tensors_.push_back(std::move(t));
  return tensors_.back().offset;
}

NormBlockOffsets ParamLayout::add_norm_block(const std::string& p) {
  const ModelConfig& c = config_;
  const int d = c.d_model, dc = c.cond_dim;
  NormBlockOffsets o;
  if (!c.adaln()) {
    o.weight = add(p + ".weight", {d});
    return o;
  }
  if (c.adaln_iter_term()) {
    o.iter_w1 = add(p + ".iter_w1", {dc, dc});
    o.iter_b1 = add(p + ".iter_b1", {dc});
    o.iter_w2 = add(p + ".iter_w2", {dc, dc});
    o.iter_b2 = add(p + ".iter_b2", {dc});
  }
  if (c.adaln_token_term()) o.tok_w = add(p + ".tok_w", {d, dc});
  o.mod_w = add(p + ".mod_w", {dc, 3 * d});
  o.mod_b = add(p + ".mod_b", {3 * d});
  return o;
}

ParamLayout::ParamLayout(const ModelConfig& c) : config_(c) {
  const int d = c.d_model, inner = c.attn_inner(), e = c.n_experts, f = c.expert_hidden;
  tok_emb = add("tok_emb", {c.vocab_size, d});
  for (int n = 0; n < c.n_layers; ++n) {
    const std::string p = "layers." + std::to_string(n);
    LayerOffsets l;
    l.attn_norm = add_norm_block(p + ".attn_norm");
    l.wqkv = add(p + ".attn.wqkv", {d, 3 * inner});
    l.wo = add(p + ".attn.wo", {inner, d});
    l.ffn_norm = add_norm_block(p + ".ffn_norm");
    l.router = add(p + ".moe.router", {d, e});
    l.w1 = add(p + ".moe.w1", {e, d, f});
    l.w3 = add(p + ".moe.w3", {e, d, f});
    l.w2 = add(p + ".moe.w2", {e, f, d});
    layers.push_back(l);
  }
  final_norm = add("final_norm.weight", {d});
  if (!c.tie_embeddings) lm_head = add("lm_head", {d, c.vocab_size});
}

const ParamTensor& ParamLayout::find(const std::string& name) const {
  for (const ParamTensor& t : tensors_) {
    if (t.name == name) return t;
  }
  throw std::out_of_range("no parameter named " + name);
}

size_t ParamLayout::expert_params_per_layer() const {
  return 3 * static_cast<size_t>(config_.n_experts) * config_.d_model * config_.expert_hidden;
}

}  // namespace loopmoe::model
