// ops.h on CUDA, part 3: causal attention (cuBLAS products batched over heads, a row kernel for
// the masked softmax), the row softmax and the cross-entropy. Mirrors model/cpu/ops_attention.cc.
#include <cmath>
#include <vector>

#include "model/cuda/cuda_util.cuh"
#include "model/cuda/ops_cuda.h"

namespace loopmoe::model::ops::cuda {

using kernel_util::block_max;
using kernel_util::block_sum;
using kernel_util::device_exp;
using kernel_util::device_log;
using kernel_util::for_each_index;
using kernel_util::gemm_strided_batched;
using kernel_util::row_threads;

namespace {

// In place over rows of att: row `row` holds query t = row % T_'s scores against keys 0..T_-1;
// keys s <= t get softmax probabilities, keys s > t zero. One block per row. Online softmax: each
// thread keeps a running (max, sum of exp(x - max)) over its keys j, j + blockDim, ... in order;
// the block's max is block_max, each thread rescales its sum to it, and block_sum adds the sums
// in its fixed tree.
template <typename T>
__global__ void causal_softmax_kernel(T* att, int T_) {
  __shared__ T shared[32];
  const size_t row = blockIdx.x;
  const int t = static_cast<int>(row % T_);
  T* r = att + row * T_;
  const T lowest = -INFINITY;
  T mx = lowest, sum = 0;
  for (int s = threadIdx.x; s <= t; s += blockDim.x) {
    const T x = r[s];
    const T m = x > mx ? x : mx;
    sum = sum * device_exp(mx - m) + device_exp(x - m);
    mx = m;
  }
  const T row_max = block_max(mx, shared, lowest);
  sum = block_sum(mx == lowest ? T(0) : sum * device_exp(mx - row_max), shared);
  const T inv = T(1) / sum;
  for (int s = threadIdx.x; s < T_; s += blockDim.x) {
    r[s] = s <= t ? device_exp(r[s] - row_max) * inv : T(0);
  }
}

// dS = P ⊙ (dP − rowsum(dP ⊙ P)) in place over dp, rows as in causal_softmax_kernel; the row sum
// per thread in key order, then block_sum.
template <typename T>
__global__ void causal_softmax_backward_kernel(T* dp, const T* p, int T_) {
  __shared__ T shared[32];
  const size_t row = blockIdx.x;
  const int t = static_cast<int>(row % T_);
  T* dr = dp + row * T_;
  const T* pr = p + row * T_;
  T dot = 0;
  for (int s = threadIdx.x; s <= t; s += blockDim.x) dot += dr[s] * pr[s];
  dot = block_sum(dot, shared);
  for (int s = threadIdx.x; s < T_; s += blockDim.x) {
    dr[s] = s <= t ? pr[s] * (dr[s] - dot) : T(0);
  }
}

}  // namespace

template <typename T>
void attention_forward(T* out, T* att, const T* qkv, int B, int T_, int H, int hd) {
  if (B <= 0 || T_ <= 0 || H <= 0) return;
  const int inner = H * hd, ld = 3 * inner;
  const long long tt = static_cast<long long>(T_) * T_;
  const T scale = T(1) / std::sqrt(static_cast<T>(hd));
  // One batched product per sequence: head h's q, k, v start h·hd columns in, its scores h·T·T
  // values into the sequence's block of att (the full T×T, as on the CPU; the mask comes next).
  for (int b = 0; b < B; ++b) {
    const T* q = qkv + static_cast<size_t>(b) * T_ * ld;
    gemm_strided_batched(false, true, T_, T_, hd, scale, q, ld, hd, q + inner, ld, hd, T(0),
                         att + static_cast<size_t>(b) * H * tt, T_, tt, H);
  }
  causal_softmax_kernel<<<static_cast<unsigned>(static_cast<size_t>(B) * H * T_),
                          row_threads(T_)>>>(att, T_);
  LOOPMOE_CUDA_CHECK_LAUNCH();
  for (int b = 0; b < B; ++b) {
    const T* v = qkv + static_cast<size_t>(b) * T_ * ld + 2 * inner;
    gemm_strided_batched(false, false, T_, hd, T_, T(1), att + static_cast<size_t>(b) * H * tt, T_,
                         tt, v, ld, hd, T(0), out + static_cast<size_t>(b) * T_ * inner, inner, hd,
                         H);
  }
}

template <typename T>
void attention_backward(T* dqkv, T* /*scratch*/, const T* dout, const T* qkv, const T* att, int B,
                        int T_, int H, int hd) {
  if (B <= 0 || T_ <= 0 || H <= 0) return;
  const int inner = H * hd, ld = 3 * inner;
  const long long tt = static_cast<long long>(T_) * T_;
  const T scale = T(1) / std::sqrt(static_cast<T>(hd));
  // dP (then dS) of one sequence's H heads; reused sequence after sequence (default stream).
  T* dp = static_cast<T*>(kernel_util::workspace(sizeof(T) * static_cast<size_t>(H) * tt));
  for (int b = 0; b < B; ++b) {
    const size_t base = static_cast<size_t>(b) * T_ * ld;
    const T* q = qkv + base;
    const T* k = q + inner;
    const T* v = q + 2 * inner;
    T* dq = dqkv + base;
    T* dk = dq + inner;
    T* dv = dq + 2 * inner;
    const T* p = att + static_cast<size_t>(b) * H * tt;
    const T* g = dout + static_cast<size_t>(b) * T_ * inner;
    // dP = dO V^T, dV = P^T dO
    gemm_strided_batched(false, true, T_, T_, hd, T(1), g, inner, hd, v, ld, hd, T(0), dp, T_, tt,
                         H);
    gemm_strided_batched(true, false, T_, hd, T_, T(1), p, T_, tt, g, inner, hd, T(0), dv, ld, hd,
                         H);
    causal_softmax_backward_kernel<<<static_cast<unsigned>(H * T_), row_threads(T_)>>>(dp, p, T_);
    LOOPMOE_CUDA_CHECK_LAUNCH();
    // dQ = s·dS K, dK = s·dS^T Q
    gemm_strided_batched(false, false, T_, hd, T_, scale, dp, T_, tt, k, ld, hd, T(0), dq, ld, hd,
                         H);
    gemm_strided_batched(true, false, T_, hd, T_, scale, dp, T_, tt, q, ld, hd, T(0), dk, ld, hd,
                         H);
  }
}

namespace {

// One block per row of E values: probs = exp(l − max) / Σ, lse = max + log Σ. The max by
// block_max; each thread's exps summed in index order, then block_sum.
template <typename T>
__global__ void softmax_forward_kernel(T* probs, T* lse, const T* logits, int E) {
  __shared__ T shared[32];
  const size_t row = blockIdx.x;
  const T* l = logits + row * E;
  T* p = probs + row * E;
  const T lowest = -INFINITY;
  T mx = lowest;
  for (int e = threadIdx.x; e < E; e += blockDim.x) mx = l[e] > mx ? l[e] : mx;
  mx = block_max(mx, shared, lowest);
  T sum = 0;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    p[e] = device_exp(l[e] - mx);
    sum += p[e];
  }
  sum = block_sum(sum, shared);
  for (int e = threadIdx.x; e < E; e += blockDim.x) p[e] /= sum;  // this thread's own writes
  if (threadIdx.x == 0) lse[row] = mx + device_log(sum);
}

template <typename T>
__global__ void softmax_backward_kernel(T* dlogits, const T* dprobs, const T* probs, int E) {
  __shared__ T shared[32];
  const size_t row = blockIdx.x;
  const T* dp = dprobs + row * E;
  const T* p = probs + row * E;
  T* dl = dlogits + row * E;
  T dot = 0;
  for (int e = threadIdx.x; e < E; e += blockDim.x) dot += dp[e] * p[e];
  dot = block_sum(dot, shared);
  for (int e = threadIdx.x; e < E; e += blockDim.x) dl[e] = p[e] * (dp[e] - dot);
}

// Softmax of each row into probs (times 1/Σ, as the CPU's cross-entropy does) and the row's loss
// −(l[target] − max − log Σ) in double. Reductions as in softmax_forward_kernel.
template <typename T>
__global__ void crossentropy_rows_kernel(double* losses, T* probs, const T* logits,
                                         const int32_t* targets, int V) {
  __shared__ T shared[32];
  const size_t row = blockIdx.x;
  const T* l = logits + row * V;
  T* p = probs + row * V;
  const T lowest = -INFINITY;
  T mx = lowest;
  for (int v = threadIdx.x; v < V; v += blockDim.x) mx = l[v] > mx ? l[v] : mx;
  mx = block_max(mx, shared, lowest);
  T sum = 0;
  for (int v = threadIdx.x; v < V; v += blockDim.x) {
    p[v] = device_exp(l[v] - mx);
    sum += p[v];
  }
  sum = block_sum(sum, shared);
  const T inv = T(1) / sum;
  for (int v = threadIdx.x; v < V; v += blockDim.x) p[v] *= inv;
  if (threadIdx.x == 0) {
    losses[row] = -(static_cast<double>(l[targets[row]]) - static_cast<double>(mx) -
                    log(static_cast<double>(sum)));
  }
}

// The rows' losses on the host, in row order.
template <typename T>
std::vector<double> crossentropy_rows(T* probs, const T* logits, const int32_t* targets, int S,
                                      int V) {
  std::vector<double> losses(S > 0 ? S : 0);
  if (S <= 0) return losses;
  double* device_losses = static_cast<double*>(kernel_util::workspace(sizeof(double) * S));
  crossentropy_rows_kernel<<<S, row_threads(V)>>>(device_losses, probs, logits, targets, V);
  LOOPMOE_CUDA_CHECK_LAUNCH();
  kernel_util::to_host(losses.data(), device_losses, losses.size());
  return losses;
}

}  // namespace

template <typename T>
void softmax_forward(T* probs, T* lse, const T* logits, int S, int E) {
  if (S <= 0) return;
  softmax_forward_kernel<<<S, row_threads(E)>>>(probs, lse, logits, E);
  LOOPMOE_CUDA_CHECK_LAUNCH();
}

template <typename T>
void softmax_backward(T* dlogits, const T* dprobs, const T* probs, int S, int E) {
  if (S <= 0) return;
  softmax_backward_kernel<<<S, row_threads(E)>>>(dlogits, dprobs, probs, E);
  LOOPMOE_CUDA_CHECK_LAUNCH();
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
  // Elementwise (dlogits may alias probs: each index reads its own probability first).
  for_each_index(static_cast<size_t>(S) * V, [=] __device__(size_t idx) {
    const size_t s = idx / V;
    const int v = static_cast<int>(idx % V);
    T d = probs[idx] * scale;
    if (v == targets[s]) d -= scale;
    dlogits[idx] = d;
  });
}

// This file's entries of model/ops_list.h.
LOOPMOE_OPS_ATTENTION(LOOPMOE_OPS_INSTANTIATE, float)

}  // namespace loopmoe::model::ops::cuda
