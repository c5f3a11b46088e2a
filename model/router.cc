// The router: kernels of ops.h over the tokens, host bookkeeping over the experts' counts.
#include "model/router.h"

#include <algorithm>
#include <cmath>

#include "model/ops.h"

namespace loopmoe::model {

void router_forward(RoutingPlan& plan, RouterActivations& acts, const float* u,
                    const float* router_w, int S, int D, const RouterOptions& opt,
                    const RouterStatsReducer& reduce) {
  const int E = opt.num_experts, k = opt.top_k;
  acts.logits.resize(static_cast<size_t>(S) * E);
  acts.probs.resize(static_cast<size_t>(S) * E);
  acts.lse.resize(S);
  ops::matmul_forward(acts.logits.data(), u, router_w, static_cast<const float*>(nullptr), S, D, E);
  ops::softmax_forward(acts.probs.data(), acts.lse.data(), acts.logits.data(), S, E);

  plan.num_tokens = S;
  plan.num_experts = E;
  plan.top_k = k;
  acts.expert.resize(static_cast<size_t>(S) * k);
  acts.weight.resize(static_cast<size_t>(S) * k);
  ops::router_topk_forward(acts.expert.data(), acts.weight.data(), acts.probs.data(), S, E, k,
                           opt.renormalize);
  // The host bookkeeping below (capacity walk, dispatch layout) reads the choices on the host.
  plan.expert = copy_to_host(acts.expert);
  plan.device_expert = acts.expert.data();
  plan.weight = copy_to_host(acts.weight);
  plan.kept.assign(static_cast<size_t>(S) * k, 1);
  // Batch statistics in fixed point (order-free); reduced over the batch if asked.
  RouterBatchStats stats;
  stats.tokens = S;
  stats.assigned.assign(E, 0);
  stats.prob_sum.assign(E, ops::LossSum{});
  stats.preceding.assign(E, 0);
  ops::router_stats(stats.assigned.data(), stats.prob_sum.data(), &stats.lse_sq_sum,
                    acts.expert.data(), acts.probs.data(), acts.lse.data(), S, E, k);
  if (reduce) reduce(stats);
  const int64_t batch_S = stats.tokens;
  plan.batch_tokens = batch_S;
  plan.assigned = stats.assigned;
  // Capacity drops walk the batch's slots in order: that order is part of the model's definition.
  plan.received.assign(E, 0);
  plan.dropped = 0;
  if (opt.capacity_factor > 0) {
    const int64_t capacity =
        static_cast<int64_t>(std::ceil(opt.capacity_factor * batch_S * k / static_cast<double>(E)));
    for (size_t i = 0; i < plan.expert.size(); ++i) {
      const int e = plan.expert[i];
      if (stats.preceding[e] + plan.received[e] < capacity) {
        ++plan.received[e];
      } else {
        plan.kept[i] = 0;
        ++plan.dropped;
      }
    }
    plan.batch_kept.resize(E);
    for (int e = 0; e < E; ++e) plan.batch_kept[e] = std::min(plan.assigned[e], capacity);
  } else {
    for (size_t i = 0; i < plan.expert.size(); ++i) plan.received[plan.expert[i]]++;
    plan.batch_kept = plan.assigned;
  }
  copy_from_host(acts.kept, plan.kept.data(), plan.kept.size());
  plan.device_kept = acts.kept.data();
  // Load-balance loss E·Σ f_i P_i and z-loss.
  double aux = 0;
  for (int e = 0; e < E; ++e) {
    aux += (static_cast<double>(plan.assigned[e]) / (static_cast<double>(batch_S) * k)) *
           (stats.prob_sum[e].value() / batch_S);
  }
  plan.aux_loss = E * aux;
  plan.z_loss = stats.lse_sq_sum.value() / batch_S;
}

void router_backward(float* du, float* drouter_w, const float* dweight, const RoutingPlan& plan,
                     const RouterActivations& acts, const float* u, const float* router_w, int S,
                     int D, const RouterOptions& opt, double aux_scale, double z_scale) {
  router_backward(du, ops::GradGroups<float>::single(drouter_w, S), dweight, plan, acts, u,
                  router_w, D, opt, aux_scale, z_scale);
}

void router_backward(float* du, const ops::GradGroups<float>& drouter_w, const float* dweight,
                     const RoutingPlan& plan, const RouterActivations& acts, const float* u,
                     const float* router_w, int D, const RouterOptions& opt, double aux_scale,
                     double z_scale) {
  const int S = drouter_w.row_end(drouter_w.groups - 1);
  const int E = opt.num_experts, k = opt.top_k;
  Buffer<float> dprobs(static_cast<size_t>(S) * E);
  Buffer<float> dlogits(static_cast<size_t>(S) * E);
  // d(aux)/d p_te = E · f_e / S: one value per expert, from the (host) batch statistics.
  const double batch_S = static_cast<double>(plan.batch_tokens);  // the statistics' token count
  std::vector<float> aux_grad(E);
  for (int e = 0; e < E; ++e) {
    aux_grad[e] = static_cast<float>(
        aux_scale * E * (static_cast<double>(plan.assigned[e]) / (batch_S * k)) / batch_S);
  }
  Buffer<float> aux_bias;
  copy_from_host(aux_bias, aux_grad.data(), aux_grad.size());
  ops::router_topk_backward(dprobs.data(), dweight, acts.probs.data(), acts.expert.data(),
                            acts.weight.data(), aux_bias.data(), S, E, k, opt.renormalize);
  ops::softmax_backward(dlogits.data(), dprobs.data(), acts.probs.data(), S, E);
  if (z_scale != 0) {
    // d/dlogit_te of mean_t lse_t^2 = 2·lse_t·p_te / S
    ops::router_zloss_backward(dlogits.data(), acts.probs.data(), acts.lse.data(), S, E, z_scale,
                               batch_S);
  }
  ops::matmul_backward(du, drouter_w, static_cast<const ops::GradGroups<float>*>(nullptr),
                       dlogits.data(), u, router_w, D, E);
}

}  // namespace loopmoe::model
