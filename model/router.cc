// The router: kernels of ops.h over the tokens, host bookkeeping over the experts' counts.
#include "model/router.h"

#include <algorithm>
#include <cmath>

#include "model/ops.h"

namespace loopmoe::model {

void router_forward(RoutingPlan& plan, RouterActivations& acts, const float* u,
                    const float* router_w, int S, int D, const RouterOptions& opt,
                    const RouterStatsReducer& reduce, bool host_plan) {
  const int E = opt.num_experts, k = opt.top_k;
  const size_t slots = static_cast<size_t>(S) * k;
  acts.logits.resize(static_cast<size_t>(S) * E);
  acts.probs.resize(static_cast<size_t>(S) * E);
  acts.lse.resize(S);
  ops::matmul_forward(acts.logits.data(), u, router_w, static_cast<const float*>(nullptr), S, D, E);
  ops::softmax_forward(acts.probs.data(), acts.lse.data(), acts.logits.data(), S, E);

  plan = RoutingPlan{};
  plan.num_tokens = S;
  plan.num_experts = E;
  plan.top_k = k;
  acts.expert.resize(slots);
  acts.weight.resize(slots);
  ops::router_topk_forward(acts.expert.data(), acts.weight.data(), acts.probs.data(), S, E, k,
                           opt.renormalize);
  // Batch statistics in fixed point (order-free), on the device.
  acts.assigned.resize(E);
  acts.prob_sum.resize(E);
  acts.lse_sq_sum.resize(1);
  ops::router_stats(acts.assigned.data(), acts.prob_sum.data(), acts.lse_sq_sum.data(),
                    acts.expert.data(), acts.probs.data(), acts.lse.data(), S, E, k);
  int64_t batch_S = S;
  const int64_t* preceding = nullptr;
  if (reduce) {
    // Reduced over the batch on the host (the distributed runtime's collectives), then back to
    // the device for the capacity walk, the backward's balance gradient and routing_to_host.
    RouterBatchStats stats;
    stats.tokens = S;
    stats.assigned = copy_to_host(acts.assigned);
    stats.prob_sum = copy_to_host(acts.prob_sum);
    stats.lse_sq_sum = copy_to_host(acts.lse_sq_sum)[0];
    stats.preceding.assign(E, 0);
    reduce(stats);
    batch_S = stats.tokens;
    copy_from_host(acts.assigned, stats.assigned.data(), E);
    copy_from_host(acts.prob_sum, stats.prob_sum.data(), E);
    copy_from_host(acts.lse_sq_sum, &stats.lse_sq_sum, 1);
    copy_from_host(acts.preceding, stats.preceding.data(), E);
    preceding = acts.preceding.data();
  }
  plan.batch_tokens = batch_S;
  // Capacity drops walk the batch's slots in order: that order is part of the model's definition.
  if (opt.capacity_factor > 0) {
    plan.capacity =
        static_cast<int64_t>(std::ceil(opt.capacity_factor * batch_S * k / static_cast<double>(E)));
  }
  acts.kept.resize(slots);
  acts.received.resize(E);
  ops::moe_capacity_keep(acts.kept.data(), acts.received.data(), acts.expert.data(), preceding,
                         plan.capacity, slots, E);
  plan.device_expert = acts.expert.data();
  plan.device_kept = acts.kept.data();
  plan.device_received = acts.received.data();
  if (reduce || host_plan) routing_to_host(plan, acts, /*slots=*/true);
}

void routing_to_host(RoutingPlan& plan, const RouterActivations& acts, bool slots) {
  const int E = plan.num_experts, k = plan.top_k;
  if (!plan.summary_on_host) {
    plan.assigned = copy_to_host(acts.assigned);
    plan.received = copy_to_host(acts.received);
    const std::vector<ops::LossSum> prob_sum = copy_to_host(acts.prob_sum);
    const ops::LossSum lse_sq_sum = copy_to_host(acts.lse_sq_sum)[0];
    plan.dropped = static_cast<int64_t>(plan.num_tokens) * k;
    for (int e = 0; e < E; ++e) plan.dropped -= plan.received[e];
    plan.batch_kept = plan.assigned;
    if (plan.capacity >= 0) {
      for (int64_t& kept : plan.batch_kept) kept = std::min(kept, plan.capacity);
    }
    // Load-balance loss E·Σ f_i P_i and z-loss.
    const int64_t batch_S = plan.batch_tokens;
    double aux = 0;
    for (int e = 0; e < E; ++e) {
      aux += (static_cast<double>(plan.assigned[e]) / (static_cast<double>(batch_S) * k)) *
             (prob_sum[e].value() / batch_S);
    }
    plan.aux_loss = E * aux;
    plan.z_loss = lse_sq_sum.value() / batch_S;
    plan.summary_on_host = true;
  }
  if (slots && !plan.slots_on_host) {
    plan.expert = copy_to_host(acts.expert);
    plan.weight = copy_to_host(acts.weight);
    plan.kept = copy_to_host(acts.kept);
    plan.slots_on_host = true;
  }
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
  // d(aux)/d p_te = E · f_e / S: one value per expert, from the batch's assignments.
  const double batch_S = static_cast<double>(plan.batch_tokens);  // the statistics' token count
  Buffer<float> aux_bias(E);
  ops::router_balance_bias(aux_bias.data(), acts.assigned.data(), E, k, batch_S, aux_scale);
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
