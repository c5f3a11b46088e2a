// The order, names and shapes of every parameter in the flat buffer (docs/MODEL.md).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "model/config.h"

namespace loopmoe::model {

struct ParamTensor {
  std::string name;
  size_t offset = 0;
  std::vector<int> shape;
  size_t numel() const;
};

// Offsets of one norm block (attn_norm or ffn_norm of a unique layer). npos = absent in this mode.
struct NormBlockOffsets {
  static constexpr size_t npos = static_cast<size_t>(-1);
  size_t weight = npos;  // off mode
  size_t iter_w1 = npos, iter_b1 = npos, iter_w2 = npos, iter_b2 = npos;
  size_t tok_w = npos;
  size_t mod_w = npos, mod_b = npos;
};

struct LayerOffsets {
  NormBlockOffsets attn_norm;
  size_t wqkv = 0, wo = 0;
  NormBlockOffsets ffn_norm;
  size_t router = 0, w1 = 0, w3 = 0, w2 = 0;
};

class ParamLayout {
 public:
  explicit ParamLayout(const ModelConfig& config);

  size_t size() const { return total_; }
  const std::vector<ParamTensor>& tensors() const { return tensors_; }
  const ParamTensor& find(const std::string& name) const;  // throws std::out_of_range

  size_t tok_emb = 0;
  std::vector<LayerOffsets> layers;
  size_t final_norm = 0;
  size_t lm_head = NormBlockOffsets::npos;  // untied only

  // Parameters per unique layer that belong to its experts (w1, w3, w2 of all experts).
  size_t expert_params_per_layer() const;

 private:
  size_t add(const std::string& name, std::vector<int> shape);
  NormBlockOffsets add_norm_block(const std::string& prefix);

  const ModelConfig config_;
  std::vector<ParamTensor> tensors_;
  size_t total_ = 0;
};

}  // namespace loopmoe::model
