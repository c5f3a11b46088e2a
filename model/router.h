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

// Which expert each (token, slot) goes to. Slot j of token t is entry t*k + j. Host memory: the
// capacity walk, the dispatch bookkeeping and the distributed runtime's headers read it on the
// host. The kernels use the device copies in RouterActivations (expert and weight copied back
// after the top-k kernel, kept copied to the device after the capacity walk).
struct RoutingPlan {
  int num_tokens = 0, num_experts = 0, top_k = 0;
  std::vector<int32_t> expert;      // [S*k]
  std::vector<float> weight;        // [S*k] combine weight (computed before drops)
  std::vector<uint8_t> kept;        // [S*k] 0 = dropped by capacity
  std::vector<int64_t> assigned;    // [E] top-k assignments before drops, over the whole batch
  std::vector<int64_t> received;    // [E] this process's slots kept after drops
  std::vector<int64_t> batch_kept;  // [E] slots kept over the whole batch
  int64_t batch_tokens = 0;         // tokens of the whole batch (= num_tokens in one process)
  int64_t dropped = 0;              // this process's dropped slots
  double aux_loss = 0;              // E · Σ f_i P_i over the whole batch
  double z_loss = 0;                // mean (logsumexp)^2 over the whole batch
  // `expert` and `kept` in the activations' memory (RouterActivations::expert and kept, which
  // router_forward fills), for the dispatch kernels; valid while those activations live. nullptr:
  // not there (a plan built by hand), and the dispatcher uploads them.
  const int32_t* device_expert = nullptr;
  const uint8_t* device_kept = nullptr;
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
  // The plan's expert, weight and kept [S*k] on the device, for the kernels.
  Buffer<int32_t> expert;
  Buffer<float> weight;
  Buffer<uint8_t> kept;
};

struct RouterOptions {
  int num_experts = 0, top_k = 0;
  bool renormalize = true;
  double capacity_factor = 0;  // 0 = dropless
};

// u[S,D] @ router[D,E] → plan. Statistics (f_i, P_i, capacity, z) are over these S tokens, or,
// when `reduce` is given, over whatever batch it reduces them to.
void router_forward(RoutingPlan& plan, RouterActivations& acts, const float* u,
                    const float* router_w, int S, int D, const RouterOptions& opt,
                    const RouterStatsReducer& reduce = {});

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
