// MoE FFN sublayer: route, hand rows to the Dispatcher, combine expert outputs with the weights.
#pragma once

#include <vector>

#include "model/buffer.h"
#include "model/config.h"
#include "model/dispatcher.h"
#include "model/router.h"

namespace loopmoe::model {

struct MoeActivations {
  RouterActivations router;
  RoutingPlan plan;
  Buffer<float> expert_out;  // [S*k, D] unweighted expert outputs per slot
};

class MoeLayer {
 public:
  explicit MoeLayer(const ModelConfig& config);

  // y[S,D] = Σ_kept slots w · expert(u).
  void forward(MoeActivations& acts, Dispatcher& dispatcher, int application, int layer,
               const float* router_w, const float* u, float* y, int S) const;
  // du[S,D] += ..., drouter_w += ...; expert gradients accumulate through the dispatcher.
  // drouter_w's row groups give S.
  void backward(float* du, const ops::GradGroups<float>& drouter_w, Dispatcher& dispatcher,
                int application, int layer, const MoeActivations& acts, const float* router_w,
                const float* u, const float* dy, double aux_scale, double z_scale) const;

 private:
  RouterOptions options_;
  int d_model_;
};

}  // namespace loopmoe::model
