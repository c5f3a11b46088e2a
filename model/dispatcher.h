// The seam between the MoE layer and wherever its experts live. The MoE layer routes and combines;
// a Dispatcher moves token rows to experts and expert outputs back. The local dispatcher runs the
// experts in this process; a collective one (distributed service) exchanges rows by all-to-all.
// Both must produce the same numbers.
#pragma once

#include "model/router.h"

namespace loopmoe {

class Dispatcher {
 public:
  virtual ~Dispatcher() = default;

  // For every kept slot (t, j) of `plan`, out[t*k + j, :] = expert_{plan.expert}(x[t, :]) using the
  // experts of unique layer `layer`; dropped slots get zeros. `application` identifies this layer
  // application within the step (activations are kept per application for backward).
  virtual void forward(int application, int layer, const RoutingPlan& plan, const float* x,
                       float* out) = 0;

  // dx[t, :] += Σ_j d(expert output of slot (t, j)) / dx_t · dout[t*k + j, :]; expert weight
  // gradients accumulate wherever the experts live.
  virtual void backward(int application, int layer, const RoutingPlan& plan, const float* dout,
                        float* dx) = 0;

  // Turns the router's statistics of this process's tokens into those of the whole batch (see
  // RouterBatchStats). One process holds the whole batch: nothing to do.
  virtual void reduce_batch_stats(RouterBatchStats& /*stats*/) {}
};

}  // namespace loopmoe
