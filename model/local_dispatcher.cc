#include "model/local_dispatcher.h"

#include <algorithm>

namespace loopmoe {

LocalDispatcher::LocalDispatcher(const ModelConfig& config, const ParamLayout& layout,
                                 const float* params, float* grads)
    : shape_{config.d_model, config.expert_hidden},
      layout_(layout),
      params_(params),
      grads_(grads) {}

ExpertWeights LocalDispatcher::weights(int layer) const {
  const LayerOffsets& l = layout_.layers[layer];
  return ExpertWeights{params_ + l.w1, params_ + l.w3, params_ + l.w2,
                       grads_ + l.w1,  grads_ + l.w3,  grads_ + l.w2};
}

void LocalDispatcher::forward(int application, int layer, const RoutingPlan& plan, const float* x,
                              float* out) {
  if (static_cast<int>(saved_.size()) <= application) saved_.resize(application + 1);
  Saved& sv = saved_[application];
  const int E = plan.num_experts, D = shape_.d_model;
  const size_t slots = plan.expert.size();
  // Group kept slots by expert, in slot order within an expert.
  ExpertBatch& b = sv.batch;
  b.offset.assign(E + 1, 0);
  for (int e = 0; e < E; ++e) b.offset[e + 1] = b.offset[e] + plan.received[e];
  std::vector<int64_t> cursor(b.offset.begin(), b.offset.end() - 1);
  sv.row_of_slot.assign(slots, -1);
  for (size_t i = 0; i < slots; ++i) {
    if (plan.kept[i]) sv.row_of_slot[i] = cursor[plan.expert[i]]++;
  }
  const int64_t rows = b.offset[E];
  b.x.resize(static_cast<size_t>(rows) * D);
  const int k = plan.top_k;
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < slots; ++i) {
    if (sv.row_of_slot[i] >= 0) {
      std::copy_n(x + (i / k) * D, D, b.x.data() + sv.row_of_slot[i] * D);
    }
  }
  std::vector<float> y(static_cast<size_t>(rows) * D);
  experts_forward(y.data(), b, weights(layer), shape_);
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < slots; ++i) {
    float* o = out + i * D;
    if (sv.row_of_slot[i] >= 0) {
      std::copy_n(y.data() + sv.row_of_slot[i] * D, D, o);
    } else {
      std::fill_n(o, D, 0.f);
    }
  }
}

void LocalDispatcher::backward(int application, int layer, const RoutingPlan& plan,
                               const float* dout, float* dx) {
  Saved& sv = saved_.at(application);
  const int D = shape_.d_model, k = plan.top_k, S = plan.num_tokens;
  const int64_t rows = sv.batch.offset.back();
  std::vector<float> dy(static_cast<size_t>(rows) * D), dxr(static_cast<size_t>(rows) * D);
  const size_t slots = plan.expert.size();
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < slots; ++i) {
    if (sv.row_of_slot[i] >= 0) std::copy_n(dout + i * D, D, dy.data() + sv.row_of_slot[i] * D);
  }
  experts_backward(dxr.data(), dy.data(), sv.batch, weights(layer), shape_);
  // Each token sums its slots in slot order: deterministic whatever the thread count.
#pragma omp parallel for schedule(static)
  for (int t = 0; t < S; ++t) {
    float* d = dx + static_cast<size_t>(t) * D;
    for (int j = 0; j < k; ++j) {
      const int64_t r = sv.row_of_slot[static_cast<size_t>(t) * k + j];
      if (r < 0) continue;
      const float* g = dxr.data() + r * D;
      for (int i = 0; i < D; ++i) d[i] += g[i];
    }
  }
}

}  // namespace loopmoe
