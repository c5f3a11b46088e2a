// ops.h on CUDA, part 3: causal attention (fused flash kernels, and the materialized reference:
// cuBLAS products batched over heads with a row kernel for the masked softmax), the row softmax
// and the cross-entropy. Mirrors model/cpu/ops_attention.cc.
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "model/bf16.h"
#include "model/cuda/cuda_util.cuh"
#include "model/cuda/flash_attention.cuh"
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

// ---- The materialized reference: the CPU's algorithm with cuBLAS products ----
// Scores of one sequence's H heads in a T×T block each, the masked row softmax in place, P·V by
// cuBLAS; the backward recomputes P the same way. Kept beside the fused kernels (it is what they
// are tested against on the GPU) and used for head sizes the fused kernels do not cover.

// In place over rows of att: row `row` holds query t = row % T_'s scores against keys 0..T_-1;
// keys s <= t get softmax probabilities, keys s > t zero; lse[row] (when not null) = the row's
// log Σ exp. One block per row. Online softmax: each thread keeps a running (max, sum of
// exp(x - max)) over its keys j, j + blockDim, ... in order; the block's max is block_max, each
// thread rescales its sum to it, and block_sum adds the sums in its fixed tree.
template <typename T>
__global__ void causal_softmax_kernel(T* att, T* lse, int T_) {
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
  if (lse != nullptr && threadIdx.x == 0) lse[row] = row_max + device_log(sum);
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

// The probabilities p[H][T][T] of one sequence's H heads (q_seq: the sequence's first qkv row)
// and, when lse is not null, their lse[H][T].
void materialized_probabilities(float* p, float* lse, const float* q_seq, int T_, int H, int hd) {
  const int inner = H * hd, ld = 3 * inner;
  const long long tt = static_cast<long long>(T_) * T_;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  // One batched product: head h's q and k start h·hd columns in, its scores h·T·T values in.
  gemm_strided_batched(false, true, T_, T_, hd, scale, q_seq, ld, hd, q_seq + inner, ld, hd, 0.f, p,
                       T_, tt, H);
  causal_softmax_kernel<<<static_cast<unsigned>(static_cast<size_t>(H) * T_), row_threads(T_)>>>(
      p, lse, T_);
  LOOPMOE_CUDA_CHECK_LAUNCH();
}

// ---- The fused (flash) kernels: flash_attention.cuh; here their launches ----
using flash::kMaxFusedHeadDim;
using flash::kTile;

// Launches kernel on a (tiles, B·H) grid of `threads` with `floats` of dynamic shared memory
// (above the 48 KB default for most head sizes: the opt-in is set before each launch, which is
// cheap).
template <typename... Params, typename... Args>
void launch_flash(void (*kernel)(Params...), int threads, size_t floats, int tiles, int BH,
                  Args... args) {
  if (BH > 65535) {
    throw std::runtime_error("attention: B·H = " + std::to_string(BH) +
                             " is above the fused kernels' grid limit of 65535");
  }
  const size_t bytes = floats * sizeof(float);
  LOOPMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(bytes)));
  kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(BH)), threads, bytes>>>(
      args...);
  LOOPMOE_CUDA_CHECK_LAUNCH();
}

// fp32: the SIMT kernels; bf16: the tensor-core (wmma) ones (flash_attention.cuh says why).
template <int HDP>
void fused_forward(float* out, float* lse, const float* qkv, int B, int T_, int H, int hd) {
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const int tiles = (T_ + kTile - 1) / kTile;
  if (matmul_precision() == MatmulPrecision::kBf16) {
    launch_flash(flash::flash_forward_wmma_kernel<HDP>, flash::kWmmaThreads,
                 flash::forward_wmma_smem_floats(HDP), tiles, B * H, out, lse, qkv, T_, H, hd,
                 scale);
  } else {
    launch_flash(flash::flash_forward_kernel<HDP>, flash::kFlashThreads,
                 flash::forward_smem_floats(HDP), tiles, B * H, out, lse, qkv, T_, H, hd, scale,
                 false);
  }
}

template <int HDP>
void fused_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                    const float* lse, int B, int T_, int H, int hd) {
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const bool bf16 = matmul_precision() == MatmulPrecision::kBf16;
  const size_t rows = static_cast<size_t>(B) * H * T_;
  float* dsum = static_cast<float*>(kernel_util::workspace(sizeof(float) * rows));
  flash::flash_backward_dot_kernel<<<kernel_util::grid_for(rows), kernel_util::kThreads>>>(
      dsum, dout, out, B, T_, H, hd, bf16);
  LOOPMOE_CUDA_CHECK_LAUNCH();
  const int tiles = (T_ + kTile - 1) / kTile;
  const float* dsum_in = dsum;
  if (bf16) {
    launch_flash(flash::flash_backward_kv_wmma_kernel<HDP>, flash::kWmmaThreads,
                 flash::backward_kv_wmma_smem_floats(HDP), tiles, B * H, dqkv, dout, qkv, lse,
                 dsum_in, T_, H, hd, scale);
    launch_flash(flash::flash_backward_q_wmma_kernel<HDP>, flash::kWmmaThreads,
                 flash::backward_q_wmma_smem_floats(HDP), tiles, B * H, dqkv, dout, qkv, lse,
                 dsum_in, T_, H, hd, scale);
  } else {
    launch_flash(flash::flash_backward_kv_kernel<HDP>, flash::kFlashThreads,
                 flash::backward_kv_smem_floats(HDP), tiles, B * H, dqkv, dout, qkv, lse, dsum_in,
                 T_, H, hd, scale, false);
    launch_flash(flash::flash_backward_q_kernel<HDP>, flash::kFlashThreads,
                 flash::backward_q_smem_floats(HDP), tiles, B * H, dqkv, dout, qkv, lse, dsum_in,
                 T_, H, hd, scale, false);
  }
}

// The fused kernels' padded head size for hd, 0 when hd is above kMaxFusedHeadDim.
int fused_head_dim(int hd) {
  for (int hdp : {16, 32, 64, 128}) {
    if (hd <= hdp) return hdp;
  }
  return 0;
}

// LOOPMOE_CUDA_ATTENTION: "fused" (the default) or "materialized" (the reference, e.g. to measure
// one against the other with the same build). Read once; a bad value is an error at first use.
bool use_fused_attention(int hd) {
  static const bool fused = [] {
    const char* env = std::getenv("LOOPMOE_CUDA_ATTENTION");
    const std::string value = env == nullptr ? "" : env;
    if (value == "fused" || value.empty()) return true;
    if (value == "materialized") return false;
    throw std::runtime_error("LOOPMOE_CUDA_ATTENTION='" + value +
                             "': expected fused (the default) or materialized");
  }();
  return fused && fused_head_dim(hd) != 0;
}

}  // namespace

namespace kernel_util {

void attention_forward_materialized(float* out, float* lse, const float* qkv, int B, int T_, int H,
                                    int hd) {
  if (B <= 0 || T_ <= 0 || H <= 0) return;
  const int inner = H * hd, ld = 3 * inner;
  const long long tt = static_cast<long long>(T_) * T_;
  // One sequence at a time: its H heads' T×T probabilities in the workspace.
  float* p = static_cast<float*>(workspace(sizeof(float) * static_cast<size_t>(H) * tt));
  for (int b = 0; b < B; ++b) {
    const float* q = qkv + static_cast<size_t>(b) * T_ * ld;
    materialized_probabilities(p, lse + static_cast<size_t>(b) * H * T_, q, T_, H, hd);
    gemm_strided_batched(false, false, T_, hd, T_, 1.f, p, T_, tt, q + 2 * inner, ld, hd, 0.f,
                         out + static_cast<size_t>(b) * T_ * inner, inner, hd, H);
  }
}

void attention_backward_materialized(float* dqkv, const float* dout, const float* qkv, int B,
                                     int T_, int H, int hd) {
  if (B <= 0 || T_ <= 0 || H <= 0) return;
  const int inner = H * hd, ld = 3 * inner;
  const long long tt = static_cast<long long>(T_) * T_;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  // P (recomputed as the forward computed it) and dP, then dS in place of dP, of one sequence's
  // H heads; reused sequence after sequence (default stream).
  float* p = static_cast<float*>(workspace(sizeof(float) * 2 * static_cast<size_t>(H) * tt));
  float* dp = p + static_cast<size_t>(H) * tt;
  for (int b = 0; b < B; ++b) {
    const size_t base = static_cast<size_t>(b) * T_ * ld;
    const float* q = qkv + base;
    const float* k = q + inner;
    const float* v = q + 2 * inner;
    float* dq = dqkv + base;
    float* dk = dq + inner;
    float* dv = dq + 2 * inner;
    const float* g = dout + static_cast<size_t>(b) * T_ * inner;
    {
      RecomputeScope recompute;  // the forward's scores again: not model FLOPs (as on the CPU)
      materialized_probabilities(p, static_cast<float*>(nullptr), q, T_, H, hd);
    }
    // dP = dO V^T, dV = P^T dO
    gemm_strided_batched(false, true, T_, T_, hd, 1.f, g, inner, hd, v, ld, hd, 0.f, dp, T_, tt, H);
    gemm_strided_batched(true, false, T_, hd, T_, 1.f, p, T_, tt, g, inner, hd, 0.f, dv, ld, hd, H);
    causal_softmax_backward_kernel<<<static_cast<unsigned>(H * T_), row_threads(T_)>>>(dp, p, T_);
    LOOPMOE_CUDA_CHECK_LAUNCH();
    // dQ = s·dS K, dK = s·dS^T Q
    gemm_strided_batched(false, false, T_, hd, T_, scale, dp, T_, tt, k, ld, hd, 0.f, dq, ld, hd,
                         H);
    gemm_strided_batched(true, false, T_, hd, T_, scale, dp, T_, tt, q, ld, hd, 0.f, dk, ld, hd, H);
  }
}

// The FLOPs the CPU's attention charges (its products over the full T×T block, as
// model/budget.cc counts them): QKᵀ and P·V forward; dP, dV, dQ, dK backward, the recomputed
// scores not. The fused kernels charge the same, so the measured counts match on every device.
static uint64_t attention_products_flops(int B, int T_, int H, int hd) {
  return 2ull * B * H * static_cast<uint64_t>(T_) * T_ * hd;
}

// f(std::integral_constant<int, HDP>{}) for the fused kernels' padded head size of hd; `what`
// names the caller in the error above kMaxFusedHeadDim (nothing is charged or launched then).
template <typename F>
void with_fused_head_dim(int hd, const char* what, F&& f) {
  switch (fused_head_dim(hd)) {
    case 16:
      return f(std::integral_constant<int, 16>{});
    case 32:
      return f(std::integral_constant<int, 32>{});
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
  }
  throw std::invalid_argument(std::string(what) + ": head_dim " + std::to_string(hd) +
                              " is above " + std::to_string(kMaxFusedHeadDim));
}

void attention_forward_fused(float* out, float* lse, const float* qkv, int B, int T_, int H,
                             int hd) {
  if (B <= 0 || T_ <= 0 || H <= 0) return;
  with_fused_head_dim(hd, "attention_forward_fused", [&](auto hdp) {
    charge_gemm_flops(2 * attention_products_flops(B, T_, H, hd));
    fused_forward<decltype(hdp)::value>(out, lse, qkv, B, T_, H, hd);
  });
}

void attention_backward_fused(float* dqkv, const float* dout, const float* qkv, const float* out,
                              const float* lse, int B, int T_, int H, int hd) {
  if (B <= 0 || T_ <= 0 || H <= 0) return;
  with_fused_head_dim(hd, "attention_backward_fused", [&](auto hdp) {
    charge_gemm_flops(4 * attention_products_flops(B, T_, H, hd));
    fused_backward<decltype(hdp)::value>(dqkv, dout, qkv, out, lse, B, T_, H, hd);
  });
}

}  // namespace kernel_util

// The fused kernels unless LOOPMOE_CUDA_ATTENTION=materialized or hd > 128. `scratch` (the CPU's
// temporaries) is not used.
template <typename T>
void attention_forward(T* out, T* lse, T* /*scratch*/, const T* qkv, int B, int T_, int H, int hd) {
  if (use_fused_attention(hd)) {
    kernel_util::attention_forward_fused(out, lse, qkv, B, T_, H, hd);
  } else {
    kernel_util::attention_forward_materialized(out, lse, qkv, B, T_, H, hd);
  }
}

template <typename T>
void attention_backward(T* dqkv, T* /*scratch*/, const T* dout, const T* qkv, const T* out,
                        const T* lse, int B, int T_, int H, int hd) {
  if (use_fused_attention(hd)) {
    kernel_util::attention_backward_fused(dqkv, dout, qkv, out, lse, B, T_, H, hd);
  } else {
    kernel_util::attention_backward_materialized(dqkv, dout, qkv, B, T_, H, hd);
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
  T* p = probs + row * V;  // may be l itself (in place, ops.h)
  const T lowest = -INFINITY;
  T mx = lowest;
  for (int v = threadIdx.x; v < V; v += blockDim.x) mx = l[v] > mx ? l[v] : mx;
  // Read before block_max's barriers, so before any thread overwrites it.
  const T target = threadIdx.x == 0 ? l[targets[row]] : T(0);
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
    losses[row] =
        -(static_cast<double>(target) - static_cast<double>(mx) - log(static_cast<double>(sum)));
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
