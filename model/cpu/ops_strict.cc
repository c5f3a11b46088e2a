// ops.h on the CPU, part 5: the kernels compiled WITHOUT -ffast-math (model/CMakeLists.txt), whose
// sums must keep their written order: the optimiser (AdamW update, the gradient norm's blocked
// sum of squares, clip scaling), the IterAdaLN broadcast and column sums, the gradient groups'
// final add, and adaptive halting's row norms.
#include <algorithm>
#include <cmath>
#include <vector>

#include "model/cpu/ops_cpu.h"

namespace loopmoe::model::ops::cpu {

template <typename T>
void add_row_vector(T* x, const T* v, int S, int D) {
  for (int s = 0; s < S; ++s) {
    T* xs = x + static_cast<size_t>(s) * D;
    for (int i = 0; i < D; ++i) xs[i] += v[i];
  }
}

template <typename T>
void sum_rows(T* out, const T* x, int rows, int D) {
  for (int s = 0; s < rows; ++s) {
    const T* xs = x + static_cast<size_t>(s) * D;
    for (int i = 0; i < D; ++i) out[i] += xs[i];
  }
}

template <typename T>
void add_inplace(T* dst, const T* src, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] += src[i];
}

template <typename T>
void copy_masked_rows(T* x, const T* src, const int32_t* mask, int S, int D) {
  for (int t = 0; t < S; ++t) {
    if (mask[t]) std::copy_n(src + static_cast<size_t>(t) * D, D, x + static_cast<size_t>(t) * D);
  }
}

template <typename T>
void halt_converged_rows(int32_t* halted_at, T* frozen, const T* prev, const T* cur, int S, int D,
                         double threshold, int iteration) {
  for (int t = 0; t < S; ++t) {
    if (halted_at[t]) continue;
    double diff = 0, norm = 0;
    for (int i = 0; i < D; ++i) {
      const double x0 = prev[static_cast<size_t>(t) * D + i];
      const double x1 = cur[static_cast<size_t>(t) * D + i];
      diff += (x1 - x0) * (x1 - x0);
      norm += x0 * x0;
    }
    if (std::sqrt(diff) < threshold * std::sqrt(std::max(norm, 1e-30))) {
      halted_at[t] = iteration;
      std::copy_n(cur + static_cast<size_t>(t) * D, D, frozen + static_cast<size_t>(t) * D);
    }
  }
}

double sum_squares(const float* g, size_t n) {
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
  return total;
}

void scale_inplace(float* g, size_t n, float c) {
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; ++i) g[i] *= c;
}

void adamw_update(float* p, float* m, float* v, const float* g, const uint8_t* decay, size_t n,
                  const AdamWStep& s) {
  const float b1 = s.beta1, b2 = s.beta2, c1 = s.c1, c2 = s.c2, lrf = s.lr, eps = s.eps;
  const float wd = s.weight_decay;
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; ++i) {
    const float gi = g[i];
    m[i] = b1 * m[i] + (1.f - b1) * gi;
    v[i] = b2 * v[i] + (1.f - b2) * gi * gi;
    const float mh = m[i] * c1, vh = v[i] * c2;
    p[i] -= lrf * (mh / (std::sqrt(vh) + eps) + (decay[i] ? wd * p[i] : 0.f));
  }
}

// This file's entries of model/ops_list.h.
LOOPMOE_OPS_STRICT(LOOPMOE_OPS_INSTANTIATE, float)
LOOPMOE_OPS_STRICT(LOOPMOE_OPS_INSTANTIATE, double)

}  // namespace loopmoe::model::ops::cpu
