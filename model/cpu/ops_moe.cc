// ops.h on the CPU, part 4: the MoE kernels. The SwiGLU expert and the grouped experts (one
// thread per expert), moving rows between token and expert order (permute, unpermute, index
// gather/scatter), the weighted combine of the top-k expert outputs, and the router's top-k,
// its backward, its batch statistics and the z-loss gradient.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "model/cpu/kernel_util.h"
#include "model/cpu/ops_cpu.h"

namespace loopmoe::model::ops::cpu {

template <typename T>
void swiglu_forward(T* out, T* h1, T* h3, T* act, const T* x, const T* w1, const T* w3, const T* w2,
                    int n, int D, int F) {
  if (n == 0) return;
  gemm<T>(false, false, n, F, D, T(1), x, D, w1, F, T(0), h1, F);
  gemm<T>(false, false, n, F, D, T(1), x, D, w3, F, T(0), h3, F);
  const size_t nf = static_cast<size_t>(n) * F;
  for (size_t i = 0; i < nf; ++i) act[i] = h1[i] * sigmoid(h1[i]) * h3[i];
  gemm<T>(false, false, n, D, F, T(1), act, F, w2, D, T(0), out, D);
}

template <typename T>
void swiglu_backward(T* dx, T* dw1, T* dw3, T* dw2, T* scratch, const T* dout, const T* x,
                     const T* h1, const T* h3, const T* act, const T* w1, const T* w3, const T* w2,
                     int n, int D, int F) {
  if (n == 0) return;
  const size_t nf = static_cast<size_t>(n) * F;
  T* dh1 = scratch;
  T* dh3 = scratch + nf;
  gemm<T>(true, false, F, D, n, T(1), act, F, dout, D, T(1), dw2, D);  // dW2 += act^T dout
  gemm<T>(false, true, n, F, D, T(1), dout, D, w2, D, T(0), dh1, F);   // dact = dout W2^T
  for (size_t i = 0; i < nf; ++i) {
    T sg = sigmoid(h1[i]);
    T dact = dh1[i];
    dh3[i] = dact * h1[i] * sg;
    dh1[i] = dact * h3[i] * sg * (T(1) + h1[i] * (T(1) - sg));
  }
  gemm<T>(true, false, D, F, n, T(1), x, D, dh1, F, T(1), dw1, F);
  gemm<T>(true, false, D, F, n, T(1), x, D, dh3, F, T(1), dw3, F);
  gemm<T>(false, true, n, D, F, T(1), dh1, F, w1, F, T(0), dx, D);
  gemm<T>(false, true, n, D, F, T(1), dh3, F, w3, F, T(1), dx, D);
}

template <typename T>
void experts_swiglu_forward(T* out, T* h1, T* h3, T* act, const T* x, const int64_t* offset, int E,
                            int64_t /*rows*/, const T* w1, const T* w3, const T* w2, int D, int F) {
  // Each expert runs on one thread from start to end, so results do not depend on scheduling.
#pragma omp parallel for schedule(dynamic, 1)
  for (int e = 0; e < E; ++e) {
    const int64_t r0 = offset[e];
    const int n = static_cast<int>(offset[e + 1] - r0);
    const size_t wf = static_cast<size_t>(e) * D * F;
    swiglu_forward(out + r0 * D, h1 + r0 * F, h3 + r0 * F, act + r0 * F, x + r0 * D, w1 + wf,
                   w3 + wf, w2 + wf, n, D, F);
  }
}

template <typename T>
void experts_swiglu_backward(T* dx, T* dw1, T* dw3, T* dw2, T* scratch, const T* dout, const T* x,
                             const T* h1, const T* h3, const T* act, const int64_t* offset, int E,
                             int64_t /*rows*/, const T* w1, const T* w3, const T* w2, int D,
                             int F) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int e = 0; e < E; ++e) {
    const int64_t r0 = offset[e];
    const int n = static_cast<int>(offset[e + 1] - r0);
    const size_t wf = static_cast<size_t>(e) * D * F;
    swiglu_backward(dx + r0 * D, dw1 + wf, dw3 + wf, dw2 + wf, scratch + 2 * r0 * F, dout + r0 * D,
                    x + r0 * D, h1 + r0 * F, h3 + r0 * F, act + r0 * F, w1 + wf, w3 + wf, w2 + wf,
                    n, D, F);
  }
}

template <typename T>
void moe_permute_forward(T* rows, const T* x, const int64_t* row_of_slot, size_t slots, int k,
                         int D) {
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < slots; ++i) {
    if (row_of_slot[i] >= 0) {
      std::copy_n(x + (i / k) * D, D, rows + row_of_slot[i] * D);
    }
  }
}

template <typename T>
void moe_permute_backward(T* dx, const T* drows, const int64_t* row_of_slot, int S, int k, int D) {
#pragma omp parallel for schedule(static)
  for (int t = 0; t < S; ++t) {
    T* d = dx + static_cast<size_t>(t) * D;
    for (int j = 0; j < k; ++j) {
      const int64_t r = row_of_slot[static_cast<size_t>(t) * k + j];
      if (r < 0) continue;
      const T* g = drows + r * D;
      for (int i = 0; i < D; ++i) d[i] += g[i];
    }
  }
}

template <typename T>
void moe_unpermute_forward(T* out, const T* rows, const int64_t* row_of_slot, size_t slots, int D) {
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < slots; ++i) {
    T* o = out + i * D;
    if (row_of_slot[i] >= 0) {
      std::copy_n(rows + row_of_slot[i] * D, D, o);
    } else {
      std::fill_n(o, D, T(0));
    }
  }
}

template <typename T>
void moe_unpermute_backward(T* drows, const T* dout, const int64_t* row_of_slot, size_t slots,
                            int D) {
  moe_permute_forward(drows, dout, row_of_slot, slots, 1, D);
}

template <typename T>
void gather_rows(T* dst, const T* src, const int64_t* index, int64_t rows, int D) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    std::copy_n(src + index[r] * D, D, dst + r * D);
  }
}

template <typename T>
void scatter_rows(T* dst, const T* src, const int64_t* index, int64_t rows, int D) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    std::copy_n(src + r * D, D, dst + index[r] * D);
  }
}

template <typename T>
void moe_combine_forward(T* y, const T* expert_out, const T* weight, const uint8_t* kept, int S,
                         int k, int D) {
#pragma omp parallel for schedule(static)
  for (int t = 0; t < S; ++t) {
    T* ys = y + static_cast<size_t>(t) * D;
    std::fill_n(ys, D, T(0));
    for (int j = 0; j < k; ++j) {
      const size_t slot = static_cast<size_t>(t) * k + j;
      if (!kept[slot]) continue;
      const T w = weight[slot];
      const T* o = expert_out + slot * D;
      for (int i = 0; i < D; ++i) ys[i] += w * o[i];
    }
  }
}

template <typename T>
void moe_combine_backward(T* dexpert_out, T* dweight, const T* dy, const T* expert_out,
                          const T* weight, const uint8_t* kept, int S, int k, int D) {
#pragma omp parallel for schedule(static)
  for (int t = 0; t < S; ++t) {
    const T* g = dy + static_cast<size_t>(t) * D;
    for (int j = 0; j < k; ++j) {
      const size_t slot = static_cast<size_t>(t) * k + j;
      T* d = dexpert_out + slot * D;
      if (!kept[slot]) {
        std::fill_n(d, D, T(0));
        dweight[slot] = T(0);
        continue;
      }
      const T* o = expert_out + slot * D;
      const T w = weight[slot];
      T dot = 0;
      for (int i = 0; i < D; ++i) {
        dot += g[i] * o[i];
        d[i] = w * g[i];
      }
      dweight[slot] = dot;
    }
  }
}

template <typename T>
void router_topk_forward(int32_t* expert, T* weight, const T* probs, int S, int E, int k,
                         bool renormalize) {
#pragma omp parallel for schedule(static)
  for (int t = 0; t < S; ++t) {
    const T* p = probs + static_cast<size_t>(t) * E;
    int32_t* ex = expert + static_cast<size_t>(t) * k;
    T* w = weight + static_cast<size_t>(t) * k;
    // Selection by repeated arg-max; strict '>' keeps the lower index on ties.
    for (int j = 0; j < k; ++j) {
      int best = -1;
      for (int e = 0; e < E; ++e) {
        bool taken = false;
        for (int q = 0; q < j; ++q) taken |= (ex[q] == e);
        if (!taken && (best < 0 || p[e] > p[best])) best = e;
      }
      ex[j] = best;
      w[j] = p[best];
    }
    if (renormalize) {
      T sum = 0;
      for (int j = 0; j < k; ++j) sum += w[j];
      for (int j = 0; j < k; ++j) w[j] /= sum;
    }
  }
}

template <typename T>
void router_topk_backward(T* dprobs, const T* dweight, const T* probs, const int32_t* expert,
                          const T* weight, const T* bias, int S, int E, int k, bool renormalize) {
#pragma omp parallel for schedule(static)
  for (int t = 0; t < S; ++t) {
    const T* p = probs + static_cast<size_t>(t) * E;
    T* dp = dprobs + static_cast<size_t>(t) * E;
    const int32_t* ex = expert + static_cast<size_t>(t) * k;
    const T* w = weight + static_cast<size_t>(t) * k;
    const T* dw = dweight + static_cast<size_t>(t) * k;
    std::fill_n(dp, E, T(0));
    if (renormalize) {
      // w_j = p_j / Z: dp_i = (dw_i − Σ_j dw_j w_j) / Z
      T z = 0, dot = 0;
      for (int j = 0; j < k; ++j) {
        z += p[ex[j]];
        dot += dw[j] * w[j];
      }
      for (int j = 0; j < k; ++j) dp[ex[j]] += (dw[j] - dot) / z;
    } else {
      for (int j = 0; j < k; ++j) dp[ex[j]] += dw[j];
    }
    for (int e = 0; e < E; ++e) dp[e] += bias[e];
  }
}

template <typename T>
void router_stats(int64_t* assigned, LossSum* prob_sum, LossSum* lse_sq_sum, const int32_t* expert,
                  const T* probs, const T* lse, int S, int E, int k) {
  std::fill_n(assigned, E, 0);
  std::fill_n(prob_sum, E, LossSum{});
  *lse_sq_sum = LossSum{};
  const size_t slots = static_cast<size_t>(S) * k;
  for (size_t i = 0; i < slots; ++i) assigned[expert[i]]++;
  for (int t = 0; t < S; ++t) {
    const T* p = probs + static_cast<size_t>(t) * E;
    for (int e = 0; e < E; ++e) prob_sum[e].add_row(p[e]);
    lse_sq_sum->add_row(static_cast<double>(lse[t]) * lse[t]);
  }
}

template <typename T>
void router_balance_bias(T* bias, const int64_t* assigned, int E, int k, double tokens,
                         double aux_scale) {
  for (int e = 0; e < E; ++e) {
    bias[e] =
        static_cast<T>(aux_scale * E * (static_cast<double>(assigned[e]) / (tokens * k)) / tokens);
  }
}

template <typename T>
void router_zloss_backward(T* dlogits, const T* probs, const T* lse, int S, int E, double z_scale,
                           double tokens) {
#pragma omp parallel for schedule(static)
  for (int t = 0; t < S; ++t) {
    const T c = static_cast<T>(z_scale * 2.0 * lse[t] / tokens);
    const T* p = probs + static_cast<size_t>(t) * E;
    T* dl = dlogits + static_cast<size_t>(t) * E;
    for (int e = 0; e < E; ++e) dl[e] += c * p[e];
  }
}

void moe_rows_by_expert(int64_t* row_of_slot, int64_t* offset, const int32_t* expert,
                        const uint8_t* kept, const int64_t* received, size_t slots, int E) {
  offset[0] = 0;
  for (int e = 0; e < E; ++e) offset[e + 1] = offset[e] + received[e];
  std::vector<int64_t> cursor(offset, offset + E);
  for (size_t i = 0; i < slots; ++i) row_of_slot[i] = kept[i] ? cursor[expert[i]]++ : -1;
}

void moe_capacity_keep(uint8_t* kept, int64_t* received, const int32_t* expert,
                       const int64_t* preceding, int64_t capacity, size_t slots, int E) {
  // The walk in slot order: a slot is kept while its expert's slots so far (this batch's earlier
  // ones included) are under the capacity.
  std::vector<int64_t> seen(E, 0);
  if (preceding != nullptr) std::copy_n(preceding, E, seen.begin());
  std::fill_n(received, E, 0);
  for (size_t i = 0; i < slots; ++i) {
    const int e = expert[i];
    kept[i] = capacity < 0 || seen[e] < capacity ? 1 : 0;
    ++seen[e];
    received[e] += kept[i];
  }
}

// This file's entries of model/ops_list.h.
LOOPMOE_OPS_MOE(LOOPMOE_OPS_INSTANTIATE, float)
LOOPMOE_OPS_MOE(LOOPMOE_OPS_INSTANTIATE, double)

}  // namespace loopmoe::model::ops::cpu
