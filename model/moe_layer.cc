#include "model/moe_layer.h"

#include <algorithm>

#include "model/ops.h"

namespace loopmoe {

MoeLayer::MoeLayer(const ModelConfig& c)
    : options_{c.n_experts, c.top_k, c.renormalize, c.capacity_factor}, d_model_(c.d_model) {}

void MoeLayer::forward(MoeActivations& a, Dispatcher& dispatcher, int application, int layer,
                       const float* router_w, const float* u, float* y, int S) const {
  const int D = d_model_, k = options_.top_k;
  {
    ops::FlopKindScope kind(ops::FlopKind::kRouter);
    router_forward(
        a.plan, a.router, u, router_w, S, D, options_,
        [&dispatcher](RouterBatchStats& stats) { dispatcher.reduce_batch_stats(stats); });
  }
  a.expert_out.resize(static_cast<size_t>(S) * k * D);
  {
    ops::FlopKindScope kind(ops::FlopKind::kExperts);
    dispatcher.forward(application, layer, a.plan, u, a.expert_out.data());
  }
#pragma omp parallel for schedule(static)
  for (int t = 0; t < S; ++t) {
    float* ys = y + static_cast<size_t>(t) * D;
    std::fill_n(ys, D, 0.f);
    for (int j = 0; j < k; ++j) {
      const size_t slot = static_cast<size_t>(t) * k + j;
      if (!a.plan.kept[slot]) continue;
      const float w = a.plan.weight[slot];
      const float* o = a.expert_out.data() + slot * D;
      for (int i = 0; i < D; ++i) ys[i] += w * o[i];
    }
  }
}

void MoeLayer::backward(float* du, const ops::GradGroups<float>& drouter_w, Dispatcher& dispatcher,
                        int application, int layer, const MoeActivations& a, const float* router_w,
                        const float* u, const float* dy, double aux_scale, double z_scale) const {
  const int D = d_model_, k = options_.top_k, S = drouter_w.row_end(drouter_w.groups - 1);
  std::vector<float> dweight(static_cast<size_t>(S) * k, 0.f);
  std::vector<float> dout(static_cast<size_t>(S) * k * D, 0.f);
#pragma omp parallel for schedule(static)
  for (int t = 0; t < S; ++t) {
    const float* g = dy + static_cast<size_t>(t) * D;
    for (int j = 0; j < k; ++j) {
      const size_t slot = static_cast<size_t>(t) * k + j;
      if (!a.plan.kept[slot]) continue;
      const float* o = a.expert_out.data() + slot * D;
      float* d = dout.data() + slot * D;
      const float w = a.plan.weight[slot];
      float dot = 0;
      for (int i = 0; i < D; ++i) {
        dot += g[i] * o[i];
        d[i] = w * g[i];
      }
      dweight[slot] = dot;
    }
  }
  {
    ops::FlopKindScope kind(ops::FlopKind::kExperts);
    dispatcher.backward(application, layer, a.plan, dout.data(), du);
  }
  ops::FlopKindScope kind(ops::FlopKind::kRouter);
  router_backward(du, drouter_w, dweight.data(), a.plan, a.router, u, router_w, D, options_,
                  aux_scale, z_scale);
}

}  // namespace loopmoe
