// AdamW over the flat parameter buffer, warmup + cosine schedule, global-norm clipping.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "model/buffer.h"
#include "model/config.h"
#include "model/flat_buffer.h"
#include "model/param_layout.h"
#include "model/zero_page_allocator.h"

namespace loopmoe::model {

// Learning rate for 0-based step `step` (docs/MODEL.md "Optimiser").
double learning_rate(const TrainConfig& train, int step);

// Global L2 norm of grads[n] (accumulated in double, fixed order).
double global_norm(const float* grads, size_t n);
// Scales grads by min(1, max_norm / (norm + 1e-6)) when max_norm > 0; returns the norm before.
// A NaN norm scales nothing and an Inf one scales by 0 (its Inf entries become NaN): callers must
// not step AdamW on a non-finite norm (train_step's numerics guard checks it).
double clip_grad_norm(float* grads, size_t n, double max_norm);

// The moments live on the device of default_device() at construction, as a Model's parameters
// (model.h); step() throws std::logic_error once the default device has changed.
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
  // The moments' host storage: on the CPU only (throws std::logic_error on a device).
  ZeroPageVector<float>& m() { return m_.host(); }
  ZeroPageVector<float>& v() { return v_.host(); }
  // The moments on any device (checkpoints: host_view, copy_from_host).
  FlatBuffer& m_buffer() { return m_; }
  FlatBuffer& v_buffer() { return v_; }
  const FlatBuffer& m_buffer() const { return m_; }
  const FlatBuffer& v_buffer() const { return v_; }
  void set_steps_taken(int64_t t) { t_ = t; }

 private:
  void init_decay(const std::vector<uint8_t>& decay);

  TrainConfig train_;
  Device device_;
  // Untouched ranges (a worker's experts) stay uncommitted on the CPU: see zero_page_allocator.h.
  FlatBuffer m_, v_;
  Buffer<uint8_t> decay_;  // per parameter: weight decay applies (tensor rank >= 2)
  int64_t t_ = 0;
};

}  // namespace loopmoe::model
