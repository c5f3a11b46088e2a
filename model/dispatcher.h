// The seam between the MoE layer and wherever its experts live. The MoE layer routes and combines;
// a Dispatcher moves token rows to experts and expert outputs back. The local dispatcher runs the
// experts in this process; a collective one (distributed service) exchanges rows by all-to-all.
// Both must produce the same numbers.
#pragma once

#include <cstdint>
#include <vector>

#include "model/router.h"

namespace loopmoe::model {

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

  // Whether forward() reads the plan's host fields (and reduce_batch_stats has work to do): the
  // router then copies the routing to the host in every layer. The local dispatcher works from
  // the plan's device copies and says no, so that nothing waits for the device per layer.
  virtual bool needs_host_plan() const { return true; }
};

// Row bookkeeping every dispatcher shares. A dispatcher lays the kept slots of a plan out as rows
// grouped by expert (slot order within an expert, so an expert sees its tokens in batch order).
// group_rows_by_expert is host bookkeeping on the plan; the row movements below are the dispatch
// kernels of ops.h (moe_permute_*, moe_unpermute_*), kept here under their old names for the
// distributed runtime.

// offset[E+1]: expert e owns rows [offset[e], offset[e+1]); row_of_slot[S*k]: -1 when dropped.
void group_rows_by_expert(const RoutingPlan& plan, std::vector<int64_t>& offset,
                          std::vector<int64_t>& row_of_slot);
// rows[row_of_slot[i], :] = src[i / per_row, :] for kept slots i: per_row = k gathers each slot's
// token (forward), per_row = 1 gathers per-slot rows (backward). D columns.
// ops::moe_permute_forward (= moe_unpermute_backward when per_row = 1).
void gather_slot_rows(float* rows, const float* src, const std::vector<int64_t>& row_of_slot,
                      int per_row, int D);
// out[i, :] = rows[row_of_slot[i], :] for every slot i, zeros for dropped ones.
// ops::moe_unpermute_forward.
void scatter_slot_rows(float* out, const float* rows, const std::vector<int64_t>& row_of_slot,
                       int D);
// dx[t, :] += Σ_j rows[row_of_slot[t*k + j], :], slots in order: deterministic for any threads.
// ops::moe_permute_backward.
void add_slot_rows_to_tokens(float* dx, const float* rows, const std::vector<int64_t>& row_of_slot,
                             int S, int k, int D);

}  // namespace loopmoe::model
