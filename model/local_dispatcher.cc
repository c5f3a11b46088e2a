// The dispatcher of one process: group the plan's rows by expert, run the experts on this
// process's weights, and move the results back (ops.h dispatch kernels via dispatcher.h).
#include "model/local_dispatcher.h"

#include "model/ops.h"

namespace loopmoe::model {

LocalDispatcher::LocalDispatcher(const ModelConfig& config, const ParamLayout& layout,
                                 const float* params, float* grads)
    : shape_{config.d_model, config.expert_hidden},
      layout_(layout),
      params_(params),
      grads_(grads) {}

ExpertWeights LocalDispatcher::weights(int layer) const {
  const LayerOffsets& l = layout_.layers[layer];
  return ExpertWeights{params_ + l.w1, params_ + l.w3, params_ + l.w2,
                       grads_ + l.w1,  grads_ + l.w3,  grads_ + l.w2};
}

void LocalDispatcher::forward(int application, int layer, const RoutingPlan& plan, const float* x,
                              float* out) {
  if (static_cast<int>(saved_.size()) <= application) saved_.resize(application + 1);
  Saved& sv = saved_[application];
  const int E = plan.num_experts, D = shape_.d_model;
  ExpertBatch& b = sv.batch;
  // The layout on the device, from the router's device copies of the routing where there are
  // some (a plan built by hand has only its host fields, which go up first).
  const size_t slots = plan.device_expert != nullptr
                           ? static_cast<size_t>(plan.num_tokens) * plan.top_k
                           : plan.expert.size();
  Buffer<int32_t> uploaded_expert;
  Buffer<uint8_t> uploaded_kept;
  Buffer<int64_t> uploaded_received;
  const int32_t* expert = plan.device_expert;
  const uint8_t* kept = plan.device_kept;
  const int64_t* received = plan.device_received;
  if (expert == nullptr || kept == nullptr || received == nullptr) {
    copy_from_host(uploaded_expert, plan.expert.data(), slots);
    copy_from_host(uploaded_kept, plan.kept.data(), slots);
    copy_from_host(uploaded_received, plan.received.data(), E);
    expert = uploaded_expert.data();
    kept = uploaded_kept.data();
    received = uploaded_received.data();
  }
  sv.row_of_slot.resize(slots);
  b.offset.resize(E + 1);
  ops::moe_rows_by_expert(sv.row_of_slot.data(), b.offset.data(), expert, kept, received, slots, E);
  // At most every slot is kept: the buffers take that many rows, so that the number of kept ones
  // need not come to the host (the experts read their offsets on the device).
  b.rows = static_cast<int64_t>(slots);
  const int64_t rows = b.rows;
  b.x.resize(static_cast<size_t>(rows) * D);
  const int64_t* row_of_slot = sv.row_of_slot.data();
  ops::moe_permute_forward(b.x.data(), x, row_of_slot, slots, plan.top_k, D);
  Buffer<float> y(static_cast<size_t>(rows) * D);
  experts_forward(y.data(), b, weights(layer), shape_);
  ops::moe_unpermute_forward(out, y.data(), row_of_slot, slots, D);
}

void LocalDispatcher::backward(int application, int layer, const RoutingPlan& plan,
                               const float* dout, float* dx) {
  Saved& sv = saved_.at(application);
  const int D = shape_.d_model;
  const int64_t rows = sv.batch.rows;
  Buffer<float> dy(static_cast<size_t>(rows) * D), dxr(static_cast<size_t>(rows) * D);
  const int64_t* row_of_slot = sv.row_of_slot.data();
  ops::moe_permute_forward(dy.data(), dout, row_of_slot, sv.row_of_slot.size(), 1, D);
  experts_backward(dxr.data(), dy.data(), sv.batch, weights(layer), shape_);
  ops::moe_permute_backward(dx, dxr.data(), row_of_slot, plan.num_tokens, plan.top_k, D);
}

}  // namespace loopmoe::model
