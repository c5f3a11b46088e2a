// ops.h on the CPU, part 3: causal attention (per sequence and head), row softmax, and the
// cross-entropy with its split-invariant fixed-point loss sum (LossSum).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "model/cpu/kernel_util.h"
#include "model/cpu/ops_cpu.h"

namespace loopmoe::model::ops {
namespace cpu {

namespace {

// Head h of sequence b: p[T,T] = the causal softmax of q k^T / √hd (row t: keys s ≤ t, zeros
// after), and, when lse is given, lse[t] = log Σ_{s≤t} exp(q_t·k_s/√hd). The forward and the
// backward's recomputation both call this, so the backward's probabilities are the forward's
// bits (the flash form keeps only lse; the CPU recomputes instead of using it).
template <typename T>
void causal_probabilities(T* p, T* lse, const T* q, const T* k, int ld, int T_, int hd) {
  const T scale = T(1) / std::sqrt(static_cast<T>(hd));
  gemm<T>(false, true, T_, T_, hd, scale, q, ld, k, ld, T(0), p, T_);
  for (int t = 0; t < T_; ++t) {
    T* row = p + static_cast<size_t>(t) * T_;
    T mx = row[0];
    for (int s = 1; s <= t; ++s) mx = std::max(mx, row[s]);
    T sum = 0;
    for (int s = 0; s <= t; ++s) {
      row[s] = fast_exp(row[s] - mx);
      sum += row[s];
    }
    T inv = T(1) / sum;
    for (int s = 0; s <= t; ++s) row[s] *= inv;
    for (int s = t + 1; s < T_; ++s) row[s] = T(0);
    if (lse != nullptr) lse[t] = mx + std::log(sum);
  }
}

}  // namespace

template <typename T>
void attention_forward(T* out, T* lse, T* scratch, const T* qkv, int B, int T_, int H, int hd) {
  const int inner = H * hd, ld = 3 * inner;
#pragma omp parallel for schedule(static)
  for (int bh = 0; bh < B * H; ++bh) {
    const int b = bh / H, h = bh % H;
    const T* q = qkv + static_cast<size_t>(b) * T_ * ld + h * hd;
    const T* v = q + 2 * inner;
    T* p = scratch + static_cast<size_t>(omp_get_thread_num()) * T_ * T_;
    causal_probabilities(p, lse + static_cast<size_t>(bh) * T_, q, q + inner, ld, T_, hd);
    gemm<T>(false, false, T_, hd, T_, T(1), p, T_, v, ld, T(0),
            out + static_cast<size_t>(b) * T_ * inner + h * hd, inner);
  }
}

template <typename T>
void attention_backward(T* dqkv, T* scratch, const T* dout, const T* qkv, const T* /*out*/,
                        const T* /*lse*/, int B, int T_, int H, int hd) {
  const int inner = H * hd, ld = 3 * inner;
  const T scale = T(1) / std::sqrt(static_cast<T>(hd));
#pragma omp parallel for schedule(static)
  for (int bh = 0; bh < B * H; ++bh) {
    const int b = bh / H, h = bh % H;
    const size_t base = static_cast<size_t>(b) * T_ * ld + h * hd;
    const T* q = qkv + base;
    const T* k = q + inner;
    const T* v = q + 2 * inner;
    T* dq = dqkv + base;
    T* dk = dq + inner;
    T* dv = dq + 2 * inner;
    const T* g = dout + static_cast<size_t>(b) * T_ * inner + h * hd;
    T* p = scratch + static_cast<size_t>(omp_get_thread_num()) * 2 * T_ * T_;
    T* dp = p + static_cast<size_t>(T_) * T_;
    {
      RecomputeScope recompute;  // the forward's scores again: not model FLOPs
      causal_probabilities(p, static_cast<T*>(nullptr), q, k, ld, T_, hd);
    }
    gemm<T>(false, true, T_, T_, hd, T(1), g, inner, v, ld, T(0), dp, T_);  // dP = dO V^T
    gemm<T>(true, false, T_, hd, T_, T(1), p, T_, g, inner, T(0), dv, ld);  // dV = P^T dO
    for (int t = 0; t < T_; ++t) {  // dS = P ⊙ (dP − rowsum(dP ⊙ P)); masked entries have P = 0
      const T* pr = p + static_cast<size_t>(t) * T_;
      T* dr = dp + static_cast<size_t>(t) * T_;
      T dot = 0;
      for (int s = 0; s <= t; ++s) dot += dr[s] * pr[s];
      for (int s = 0; s <= t; ++s) dr[s] = pr[s] * (dr[s] - dot);
      for (int s = t + 1; s < T_; ++s) dr[s] = T(0);
    }
    gemm<T>(false, false, T_, hd, T_, scale, dp, T_, k, ld, T(0), dq, ld);  // dQ = s·dS K
    gemm<T>(true, false, T_, hd, T_, scale, dp, T_, q, ld, T(0), dk, ld);   // dK = s·dS^T Q
  }
}

template <typename T>
void softmax_forward(T* probs, T* lse, const T* logits, int S, int E) {
#pragma omp parallel for schedule(static)
  for (int s = 0; s < S; ++s) {
    const T* l = logits + static_cast<size_t>(s) * E;
    T* p = probs + static_cast<size_t>(s) * E;
    T mx = *std::max_element(l, l + E);
    T sum = 0;
    for (int e = 0; e < E; ++e) {
      p[e] = fast_exp(l[e] - mx);
      sum += p[e];
    }
    for (int e = 0; e < E; ++e) p[e] /= sum;
    lse[s] = mx + std::log(sum);
  }
}

template <typename T>
void softmax_backward(T* dlogits, const T* dprobs, const T* probs, int S, int E) {
#pragma omp parallel for schedule(static)
  for (int s = 0; s < S; ++s) {
    const T* dp = dprobs + static_cast<size_t>(s) * E;
    const T* p = probs + static_cast<size_t>(s) * E;
    T* dl = dlogits + static_cast<size_t>(s) * E;
    T dot = 0;
    for (int e = 0; e < E; ++e) dot += dp[e] * p[e];
    for (int e = 0; e < E; ++e) dl[e] = p[e] * (dp[e] - dot);
  }
}

}  // namespace cpu

// LossSum is not a kernel (no device memory): the same host code for every backend.
void LossSum::add_row(double loss) {
  if (!(std::abs(loss) < 0x1p20)) {  // also catches NaN
    ++invalid;
    return;
  }
  const int64_t row = static_cast<int64_t>(std::nearbyint(loss * (1.0 / kUnit)));
  if (__builtin_add_overflow(units, row, &units)) ++invalid;
}

void LossSum::add(const LossSum& other) {
  invalid += other.invalid;
  if (__builtin_add_overflow(units, other.units, &units)) ++invalid;
}

double LossSum::value() const {
  return invalid > 0 ? std::numeric_limits<double>::quiet_NaN()
                     : static_cast<double>(units) * kUnit;
}

namespace cpu {

// Softmax of each row into probs; returns each row's loss.
template <typename T>
std::vector<double> crossentropy_rows(T* probs, const T* logits, const int32_t* targets, int S,
                                      int V) {
  std::vector<double> losses(S);
#pragma omp parallel for schedule(static)
  for (int s = 0; s < S; ++s) {
    const T* l = logits + static_cast<size_t>(s) * V;
    T* p = probs + static_cast<size_t>(s) * V;
    const T mx = *std::max_element(l, l + V);
    const T target = l[targets[s]];  // read before p, which may be l itself, overwrites it
    T sum = 0;
    for (int v = 0; v < V; ++v) {
      p[v] = fast_exp(l[v] - mx);
      sum += p[v];
    }
    T inv = T(1) / sum;
    for (int v = 0; v < V; ++v) p[v] *= inv;
    losses[s] = -(static_cast<double>(target) - mx - std::log(static_cast<double>(sum)));
  }
  return losses;
}

template <typename T>
double crossentropy_forward(T* probs, const T* logits, const int32_t* targets, int S, int V) {
  double total = 0;
  for (double x : crossentropy_rows(probs, logits, targets, S, V)) total += x;
  return total / S;
}

template <typename T>
LossSum crossentropy_forward_sum(T* probs, const T* logits, const int32_t* targets, int S, int V) {
  LossSum total;
  for (double x : crossentropy_rows(probs, logits, targets, S, V)) total.add_row(x);
  return total;
}

template <typename T>
void crossentropy_backward(T* dlogits, const T* probs, const int32_t* targets, T scale, int S,
                           int V) {
#pragma omp parallel for schedule(static)
  for (int s = 0; s < S; ++s) {
    const T* p = probs + static_cast<size_t>(s) * V;
    T* d = dlogits + static_cast<size_t>(s) * V;
    for (int v = 0; v < V; ++v) d[v] = p[v] * scale;
    d[targets[s]] -= scale;
  }
}

// This file's entries of model/ops_list.h.
LOOPMOE_OPS_ATTENTION(LOOPMOE_OPS_INSTANTIATE, float)
LOOPMOE_OPS_ATTENTION(LOOPMOE_OPS_INSTANTIATE, double)

}  // namespace cpu
}  // namespace loopmoe::model::ops
