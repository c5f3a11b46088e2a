#include "model/optimizer.h"

#include <algorithm>
#include <cmath>
#include <utility>

namespace loopmoe {

double learning_rate(const TrainConfig& t, int step) {
  if (step < t.warmup_steps) return t.lr * (step + 1) / t.warmup_steps;
  const double q = std::min(
      1.0, static_cast<double>(step - t.warmup_steps) / std::max(1, t.steps - t.warmup_steps));
  const double lr_min = t.min_lr_ratio * t.lr;
  return lr_min + 0.5 * (t.lr - lr_min) * (1.0 + std::cos(M_PI * q));
}

double global_norm(const float* g, size_t n) {
  // Blocked partial sums in a fixed order: reproducible, and accurate for millions of terms.
  constexpr size_t kBlock = 4096;
  const size_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(blocks, 0.0);
#pragma omp parallel for schedule(static)
  for (size_t b = 0; b < blocks; ++b) {
    double s = 0;
    for (size_t i = b * kBlock; i < std::min(n, (b + 1) * kBlock); ++i) {
      s += static_cast<double>(g[i]) * g[i];
    }
    partial[b] = s;
  }
  double total = 0;
  for (double s : partial) total += s;
  return std::sqrt(total);
}

double clip_grad_norm(float* g, size_t n, double max_norm) {
  const double norm = global_norm(g, n);
  if (max_norm > 0) {
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0) {
      const float c = static_cast<float>(coef);
#pragma omp parallel for schedule(static)
      for (size_t i = 0; i < n; ++i) g[i] *= c;
    }
  }
  return norm;
}

AdamW::AdamW(const ParamLayout& layout, const TrainConfig& train)
    : train_(train), decay_(layout.size(), 0) {
  m_.resize(layout.size());
  v_.resize(layout.size());
  for (const ParamTensor& t : layout.tensors()) {
    if (t.shape.size() >= 2) std::fill_n(decay_.begin() + t.offset, t.numel(), 1);
  }
}

AdamW::AdamW(std::vector<uint8_t> decay, const TrainConfig& train)
    : train_(train), decay_(std::move(decay)) {
  m_.resize(decay_.size());
  v_.resize(decay_.size());
}

void AdamW::step(float* p, const float* g, double lr) { step(p, g, lr, {{0, m_.size()}}); }

void AdamW::step(float* p, const float* g, double lr,
                 const std::vector<std::pair<size_t, size_t>>& ranges) {
  ++t_;
  const float b1 = static_cast<float>(train_.beta1), b2 = static_cast<float>(train_.beta2);
  const float c1 = static_cast<float>(1.0 / (1.0 - std::pow(train_.beta1, t_)));
  const float c2 = static_cast<float>(1.0 / (1.0 - std::pow(train_.beta2, t_)));
  const float lrf = static_cast<float>(lr), eps = static_cast<float>(train_.eps);
  const float wd = static_cast<float>(train_.weight_decay);
  for (const auto& [offset, n] : ranges) {
#pragma omp parallel for schedule(static)
    for (size_t i = offset; i < offset + n; ++i) {
      const float gi = g[i];
      m_[i] = b1 * m_[i] + (1.f - b1) * gi;
      v_[i] = b2 * v_[i] + (1.f - b2) * gi * gi;
      const float mh = m_[i] * c1, vh = v_[i] * c2;
      p[i] -= lrf * (mh / (std::sqrt(vh) + eps) + (decay_[i] ? wd * p[i] : 0.f));
    }
  }
}

}  // namespace loopmoe
