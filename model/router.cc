#include "model/router.h"

#include <algorithm>
#include <cmath>

#include "model/ops.h"

namespace loopmoe {

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
  plan.expert.assign(static_cast<size_t>(S) * k, 0);
  plan.weight.assign(static_cast<size_t>(S) * k, 0.f);
  plan.kept.assign(static_cast<size_t>(S) * k, 1);
#pragma omp parallel for schedule(static)
  for (int t = 0; t < S; ++t) {
    const float* p = acts.probs.data() + static_cast<size_t>(t) * E;
    int32_t* ex = plan.expert.data() + static_cast<size_t>(t) * k;
    float* w = plan.weight.data() + static_cast<size_t>(t) * k;
    // Selection by repeated arg-max; strict '>' keeps the lower index on ties.
    for (int j = 0; j < k; ++j) {
      int best = -1;
      for (int e = 0; e < E; ++e) {
        bool taken = false;
        for (int q = 0; q < j; ++q) taken |= (ex[q] == e);
        if (!taken && (best < 0 || p[e] > p[best])) best = e;
      }
      ex[j] = best;
      w[j] = p[best];
    }
    if (opt.renormalize) {
      float sum = 0;
      for (int j = 0; j < k; ++j) sum += w[j];
      for (int j = 0; j < k; ++j) w[j] /= sum;
    }
  }
  // Batch statistics, accumulated in double in a fixed order; reduced over the batch if asked.
  RouterBatchStats stats;
  stats.tokens = S;
  stats.assigned.assign(E, 0);
  stats.prob_sum.assign(E, ops::LossSum{});
  stats.preceding.assign(E, 0);
  for (size_t i = 0; i < plan.expert.size(); ++i) stats.assigned[plan.expert[i]]++;
  for (int t = 0; t < S; ++t) {
    const float* p = acts.probs.data() + static_cast<size_t>(t) * E;
    for (int e = 0; e < E; ++e) stats.prob_sum[e].add_row(p[e]);
    stats.lse_sq_sum.add_row(static_cast<double>(acts.lse[t]) * acts.lse[t]);
  }
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
  std::vector<float> dprobs(static_cast<size_t>(S) * E, 0.f);
  std::vector<float> dlogits(static_cast<size_t>(S) * E);
  std::vector<float> aux_grad(E);
  const double batch_S = static_cast<double>(plan.batch_tokens);  // the statistics' token count
  for (int e = 0; e < E; ++e) {
    // d(aux)/d p_te = E · f_e / S
    aux_grad[e] = static_cast<float>(
        aux_scale * E * (static_cast<double>(plan.assigned[e]) / (batch_S * k)) / batch_S);
  }
#pragma omp parallel for schedule(static)
  for (int t = 0; t < S; ++t) {
    const float* p = acts.probs.data() + static_cast<size_t>(t) * E;
    float* dp = dprobs.data() + static_cast<size_t>(t) * E;
    const int32_t* ex = plan.expert.data() + static_cast<size_t>(t) * k;
    const float* w = plan.weight.data() + static_cast<size_t>(t) * k;
    const float* dw = dweight + static_cast<size_t>(t) * k;
    if (opt.renormalize) {
      // w_j = p_j / Z: dp_i = (dw_i − Σ_j dw_j w_j) / Z
      float z = 0, dot = 0;
      for (int j = 0; j < k; ++j) {
        z += p[ex[j]];
        dot += dw[j] * w[j];
      }
      for (int j = 0; j < k; ++j) dp[ex[j]] += (dw[j] - dot) / z;
    } else {
      for (int j = 0; j < k; ++j) dp[ex[j]] += dw[j];
    }
    for (int e = 0; e < E; ++e) dp[e] += aux_grad[e];
  }
  ops::softmax_backward(dlogits.data(), dprobs.data(), acts.probs.data(), S, E);
  if (z_scale != 0) {
    // d/dlogit_te of mean_t lse_t^2 = 2·lse_t·p_te / S
#pragma omp parallel for schedule(static)
    for (int t = 0; t < S; ++t) {
      const float c = static_cast<float>(z_scale * 2.0 * acts.lse[t] / batch_S);
      const float* p = acts.probs.data() + static_cast<size_t>(t) * E;
      float* dl = dlogits.data() + static_cast<size_t>(t) * E;
      for (int e = 0; e < E; ++e) dl[e] += c * p[e];
    }
  }
  ops::matmul_backward(du, drouter_w, static_cast<const ops::GradGroups<float>*>(nullptr),
                       dlogits.data(), u, router_w, D, E);
}

}  // namespace loopmoe
