// AdamW, the learning-rate schedule and gradient clipping: scalar host code around the
// optimiser kernels of ops.h (sum_squares, scale_inplace, adamw_update).
#include "model/optimizer.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>

#include "model/ops.h"

namespace loopmoe::model {

double learning_rate(const TrainConfig& t, int step) {
  if (step < t.warmup_steps) return t.lr * (step + 1) / t.warmup_steps;
  const double q = std::min(
      1.0, static_cast<double>(step - t.warmup_steps) / std::max(1, t.steps - t.warmup_steps));
  const double lr_min = t.min_lr_ratio * t.lr;
  return lr_min + 0.5 * (t.lr - lr_min) * (1.0 + std::cos(M_PI * q));
}

double global_norm(const float* g, size_t n) { return std::sqrt(ops::sum_squares(g, n)); }

double clip_grad_norm(float* g, size_t n, double max_norm) {
  const double norm = global_norm(g, n);
  if (max_norm > 0) {
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0) ops::scale_inplace(g, n, static_cast<float>(coef));
  }
  return norm;
}

AdamW::AdamW(const ParamLayout& layout, const TrainConfig& train)
    : train_(train), device_(default_device()) {
  std::vector<uint8_t> decay(layout.size(), 0);
  for (const ParamTensor& t : layout.tensors()) {
    if (t.shape.size() >= 2) std::fill_n(decay.begin() + t.offset, t.numel(), 1);
  }
  init_decay(decay);
}

AdamW::AdamW(std::vector<uint8_t> decay, const TrainConfig& train)
    : train_(train), device_(default_device()) {
  init_decay(decay);
}

void AdamW::init_decay(const std::vector<uint8_t>& decay) {
  m_ = FlatBuffer(decay.size(), device_);
  v_ = FlatBuffer(decay.size(), device_);
  decay_ = Buffer<uint8_t>(0, device_);
  copy_from_host(decay_, decay.data(), decay.size());
}

void AdamW::step(float* p, const float* g, double lr) { step(p, g, lr, {{0, m_.size()}}); }

void AdamW::step(float* p, const float* g, double lr,
                 const std::vector<std::pair<size_t, size_t>>& ranges) {
  if (default_device() != device_) {
    throw std::logic_error(std::string("AdamW::step: the moments live on ") + to_string(device_) +
                           " but the default device is now " + to_string(default_device()));
  }
  ++t_;
  const float b1 = static_cast<float>(train_.beta1), b2 = static_cast<float>(train_.beta2);
  const float c1 = static_cast<float>(1.0 / (1.0 - std::pow(train_.beta1, t_)));
  const float c2 = static_cast<float>(1.0 / (1.0 - std::pow(train_.beta2, t_)));
  const ops::AdamWStep st{b1,
                          b2,
                          c1,
                          c2,
                          static_cast<float>(lr),
                          static_cast<float>(train_.eps),
                          static_cast<float>(train_.weight_decay)};
  for (const auto& [offset, n] : ranges) {
    ops::adamw_update(p + offset, m_.data() + offset, v_.data() + offset, g + offset,
                      decay_.data() + offset, n, st);
  }
}

}  // namespace loopmoe::model
