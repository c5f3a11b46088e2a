// MoE sublayer orchestration: router, dispatcher, and the combine kernels of ops.h.
#include "model/moe_layer.h"

#include "model/ops.h"

namespace loopmoe::model {

MoeLayer::MoeLayer(const ModelConfig& c)
    : options_{c.n_experts, c.top_k, c.renormalize, c.capacity_factor}, d_model_(c.d_model) {}

void MoeLayer::forward(MoeActivations& a, Dispatcher& dispatcher, int application, int layer,
                       const float* router_w, const float* u, float* y, int S) const {
  const int D = d_model_, k = options_.top_k;
  {
    ops::FlopKindScope kind(ops::FlopKind::kRouter);
    const bool host_plan = dispatcher.needs_host_plan();
    RouterStatsReducer reduce;
    if (host_plan) {
      reduce = [&dispatcher](RouterBatchStats& stats) { dispatcher.reduce_batch_stats(stats); };
    }
    router_forward(a.plan, a.router, u, router_w, S, D, options_, reduce, host_plan);
  }
  a.expert_out.resize(static_cast<size_t>(S) * k * D);
  {
    ops::FlopKindScope kind(ops::FlopKind::kExperts);
    dispatcher.forward(application, layer, a.plan, u, a.expert_out.data());
  }
  ops::moe_combine_forward(y, a.expert_out.data(), a.router.weight.data(), a.router.kept.data(), S,
                           k, D);
}

void MoeLayer::backward(float* du, const ops::GradGroups<float>& drouter_w, Dispatcher& dispatcher,
                        int application, int layer, const MoeActivations& a, const float* router_w,
                        const float* u, const float* dy, double aux_scale, double z_scale) const {
  const int D = d_model_, k = options_.top_k, S = drouter_w.row_end(drouter_w.groups - 1);
  Buffer<float> dweight(static_cast<size_t>(S) * k);
  Buffer<float> dout(static_cast<size_t>(S) * k * D);
  ops::moe_combine_backward(dout.data(), dweight.data(), dy, a.expert_out.data(),
                            a.router.weight.data(), a.router.kept.data(), S, k, D);
  {
    ops::FlopKindScope kind(ops::FlopKind::kExperts);
    dispatcher.backward(application, layer, a.plan, dout.data(), du);
  }
  ops::FlopKindScope kind(ops::FlopKind::kRouter);
  router_backward(du, drouter_w, dweight.data(), a.plan, a.router, u, router_w, D, options_,
                  aux_scale, z_scale);
}

}  // namespace loopmoe::model
