// MoE router: logits, softmax, top-k, combine weights, capacity drops, load-balance and z losses.
// The arithmetic over tokens is ops.h kernels (matmul, softmax, router_*); router.cc keeps the
// host bookkeeping over the E experts' counts (capacity walk, load-balance loss and its
// per-expert gradient), which consumes the batch statistics after they are reduced.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "model/buffer.h"
#include "model/ops.h"

namespace loopmoe::model {

// Which expert each (token, slot) goes to. The routing itself lives in RouterActivations, on the
// activations' device, where the kernels read it; the plan is its host copy, for the capacity's
// bookkeeping across workers, the distributed runtime's headers, the losses and the metrics.
// router_forward fills the plan at once when asked to (host_plan, and always with a reducer);
// otherwise nothing crosses to the host per layer and routing_to_host fills it later, once per
// step for the losses (the summary) and on demand for the slots.
struct RoutingPlan {
  int num_tokens = 0, num_experts = 0, top_k = 0;
  // Slot i = t*k + j; on the host only after routing_to_host(..., slots = true).
  std::vector<int32_t> expert;  // [S*k]
  std::vector<float> weight;    // [S*k] combine weight (computed before drops)
  std::vector<uint8_t> kept;    // [S*k] 0 = dropped by capacity
  // The summary; on the host after routing_to_host.
  std::vector<int64_t> assigned;    // [E] top-k assignments before drops, over the whole batch
  std::vector<int64_t> received;    // [E] this process's slots kept after drops
  std::vector<int64_t> batch_kept;  // [E] slots kept over the whole batch
  int64_t dropped = 0;              // this process's dropped slots
  double aux_loss = 0;              // E · Σ f_i P_i over the whole batch
  double z_loss = 0;                // mean (logsumexp)^2 over the whole batch
  // Known on the host from the start.
  int64_t batch_tokens = 0;  // tokens of the whole batch (= num_tokens in one process)
  int64_t capacity = -1;     // slots each expert keeps over the batch; -1 = dropless
  bool summary_on_host = false, slots_on_host = false;
  // The device copies of the routing (RouterActivations' buffers, which router_forward fills),
  // for the dispatch kernels; valid while those activations live. nullptr: not there (a plan
  // built by hand, with its host fields), and the dispatcher uploads them.
  const int32_t* device_expert = nullptr;
  const uint8_t* device_kept = nullptr;
  const int64_t* device_received = nullptr;
};

// Batch statistics of one routing. The router fills them for its own tokens; in the distributed
// service a reducer turns them into statistics of the whole global batch (summed over the
// workers that hold its parts), so that load balance and capacity are the single-process ones.
struct RouterBatchStats {
  int64_t tokens = 0;             // tokens
  std::vector<int64_t> assigned;  // [E] top-k assignments
  // Sums over tokens in fixed point (ops::LossSum), so that workers' parts add up to the single
  // process's bit for bit; they only enter the reported aux and z losses, not the gradients.
  std::vector<ops::LossSum> prob_sum;  // [E] Σ_t p_te
  ops::LossSum lse_sq_sum;             // Σ_t lse_t^2
  // [E] assignments of batch tokens that come before this process's tokens in batch order
  // (capacity keeps the first slots of each expert in that order). 0 in one process.
  std::vector<int64_t> preceding;
};
using RouterStatsReducer = std::function<void(RouterBatchStats&)>;

struct RouterActivations {
  Buffer<float> logits, probs, lse;  // [S,E], [S,E], [S]
  // The routing on the device: expert, weight and kept [S*k], and per expert the top-k
  // assignments over the batch and this process's kept slots [E].
  Buffer<int32_t> expert;
  Buffer<float> weight;
  Buffer<uint8_t> kept;
  Buffer<int64_t> assigned, received;
  // The statistics (ops.h router_stats): Σ_t p_te [E] and Σ_t lse_t² [1], over this process's
  // tokens, or over the whole batch once a reducer has run (as `assigned`).
  Buffer<ops::LossSum> prob_sum, lse_sq_sum;
  Buffer<int64_t> preceding;  // [E] RouterBatchStats::preceding, uploaded when there is a reducer
};

struct RouterOptions {
  int num_experts = 0, top_k = 0;
  bool renormalize = true;
  double capacity_factor = 0;  // 0 = dropless
};

// u[S,D] @ router[D,E] → plan. Statistics (f_i, P_i, capacity, z) are over these S tokens, or,
// when `reduce` is given, over whatever batch it reduces them to. With a reducer (its statistics
// cross to the host) or host_plan the plan is filled on the host at once, slots and summary; else
// only its device pointers and sizes, and routing_to_host fills the rest when it is needed.
void router_forward(RoutingPlan& plan, RouterActivations& acts, const float* u,
                    const float* router_w, int S, int D, const RouterOptions& opt,
                    const RouterStatsReducer& reduce = {}, bool host_plan = true);

// Copies what the plan lacks on the host from the activations: the summary (counts, drops, aux
// and z losses: 4·E + 2 numbers), and with `slots` also expert, weight and kept [S*k].
void routing_to_host(RoutingPlan& plan, const RouterActivations& acts, bool slots);

// dweight[S*k] = dL/d(combine weight) (0 for dropped slots); aux_scale and z_scale multiply the
// layer's aux and z losses in the total loss. du += ..., drouter_w += ...
void router_backward(float* du, float* drouter_w, const float* dweight, const RoutingPlan& plan,
                     const RouterActivations& acts, const float* u, const float* router_w, int S,
                     int D, const RouterOptions& opt, double aux_scale, double z_scale);
// The same with the router weight gradient accumulated per row group (its groups give S).
void router_backward(float* du, const ops::GradGroups<float>& drouter_w, const float* dweight,
                     const RoutingPlan& plan, const RouterActivations& acts, const float* u,
                     const float* router_w, int D, const RouterOptions& opt, double aux_scale,
                     double z_scale);

}  // namespace loopmoe::model
