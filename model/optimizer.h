// AdamW over the flat parameter buffer, warmup + cosine schedule, global-norm clipping.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "model/config.h"
#include "model/param_layout.h"
#include "model/zero_page_allocator.h"

namespace loopmoe::model {

// Learning rate for 0-based step `step` (docs/MODEL.md "Optimiser").
double learning_rate(const TrainConfig& train, int step);

// Global L2 norm of grads[n] (accumulated in double, fixed order).
double global_norm(const float* grads, size_t n);
// Scales grads by min(1, max_norm / (norm + 1e-6)) when max_norm > 0; returns the norm before.
double clip_grad_norm(float* grads, size_t n, double max_norm);

class AdamW {
 public:
  AdamW(const ParamLayout& layout, const TrainConfig& train);
  // Over a buffer of its own (an expert shard's experts): decay[i] != 0 where weight decay
  // applies.
  AdamW(std::vector<uint8_t> decay, const TrainConfig& train);

  // One update with learning rate lr; increments the step counter.
  void step(float* params, const float* grads, double lr);
  // The same, touching only the [offset, length) ranges (a worker's replica: the experts live on
  // the shards); the other parameters and moments stay as they are.
  void step(float* params, const float* grads, double lr,
            const std::vector<std::pair<size_t, size_t>>& ranges);

  int64_t steps_taken() const { return t_; }
  ZeroPageVector<float>& m() { return m_; }
  ZeroPageVector<float>& v() { return v_; }
  void set_steps_taken(int64_t t) { t_ = t; }

 private:
  TrainConfig train_;
  // Untouched ranges (a worker's experts) stay uncommitted: see zero_page_allocator.h.
  ZeroPageVector<float> m_, v_;
  std::vector<uint8_t> decay_;  // per parameter: weight decay applies (tensor rank >= 2)
  int64_t t_ = 0;
};

}  // namespace loopmoe::model
