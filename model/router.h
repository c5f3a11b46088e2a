// MoE router: logits, softmax, top-k, combine weights, capacity drops, load-balance and z losses.
#pragma once

#include <cstdint>
#include <vector>

namespace loopmoe {

// Which expert each (token, slot) goes to. Slot j of token t is entry t*k + j.
struct RoutingPlan {
  int num_tokens = 0, num_experts = 0, top_k = 0;
  std::vector<int32_t> expert;    // [S*k]
  std::vector<float> weight;      // [S*k] combine weight (computed before drops)
  std::vector<uint8_t> kept;      // [S*k] 0 = dropped by capacity
  std::vector<int64_t> assigned;  // [E] top-k assignments before drops
  std::vector<int64_t> received;  // [E] after drops
  int64_t dropped = 0;
  double aux_loss = 0;  // E · Σ f_i P_i
  double z_loss = 0;    // mean (logsumexp)^2
};

struct RouterActivations {
  std::vector<float> logits, probs, lse;  // [S,E], [S,E], [S]
};

struct RouterOptions {
  int num_experts = 0, top_k = 0;
  bool renormalize = true;
  double capacity_factor = 0;  // 0 = dropless
};

// u[S,D] @ router[D,E] → plan. Statistics (f_i, P_i, capacity) are over these S tokens.
void router_forward(RoutingPlan& plan, RouterActivations& acts, const float* u,
                    const float* router_w, int S, int D, const RouterOptions& opt);

// dweight[S*k] = dL/d(combine weight) (0 for dropped slots); aux_scale and z_scale multiply the
// layer's aux and z losses in the total loss. du += ..., drouter_w += ...
void router_backward(float* du, float* drouter_w, const float* dweight, const RoutingPlan& plan,
                     const RouterActivations& acts, const float* u, const float* router_w, int S,
                     int D, const RouterOptions& opt, double aux_scale, double z_scale);

}  // namespace loopmoe
