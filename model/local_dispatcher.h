// Dispatcher for one process: the experts of every layer are in this process's parameter buffer.
#pragma once

#include <vector>

#include "model/buffer.h"
#include "model/dispatcher.h"
#include "model/experts.h"
#include "model/param_layout.h"

namespace loopmoe::model {

class LocalDispatcher : public Dispatcher {
 public:
  LocalDispatcher(const ModelConfig& config, const ParamLayout& layout, const float* params,
                  float* grads);

  void forward(int application, int layer, const RoutingPlan& plan, const float* x,
               float* out) override;
  void backward(int application, int layer, const RoutingPlan& plan, const float* dout,
                float* dx) override;
  bool needs_host_plan() const override { return false; }

 private:
  struct Saved {
    ExpertBatch batch;
    Buffer<int64_t> row_of_slot;  // [S*k] row in batch, -1 when dropped (ops.h moe_rows_by_expert)
  };
  ExpertWeights weights(int layer) const;

  ExpertShape shape_;
  const ParamLayout& layout_;
  const float* params_;
  float* grads_;
  std::vector<Saved> saved_;  // per application
};

}  // namespace loopmoe::model
