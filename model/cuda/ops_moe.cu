// ops.h on CUDA, part 4: the MoE kernels. The SwiGLU expert and the grouped experts (grouped
// cuBLAS products over all experts in fp32, expert_gemm.cuh's kernel in bf16, with the per-expert
// loop beside them as the reference),
// moving rows between token and expert order, the weighted combine, and the router's top-k, its
// backward, batch statistics and z-loss gradient. Mirrors model/cpu/ops_moe.cc.
#include <algorithm>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "model/cuda/cuda_util.cuh"
#include "model/cuda/expert_gemm.cuh"
#include "model/cuda/expert_rows.cuh"
#include "model/cuda/ops_cuda.h"
#include "model/cuda/router_stats.cuh"

namespace loopmoe::model::ops::cuda {

using kernel_util::block_sum;
using kernel_util::device_sigmoid;
using kernel_util::for_each_index;

template <typename T>
void swiglu_forward(T* out, T* h1, T* h3, T* act, const T* x, const T* w1, const T* w3, const T* w2,
                    int n, int D, int F) {
  if (n == 0) return;
  gemm<T>(false, false, n, F, D, T(1), x, D, w1, F, T(0), h1, F);
  gemm<T>(false, false, n, F, D, T(1), x, D, w3, F, T(0), h3, F);
  for_each_index(static_cast<size_t>(n) * F,
                 [=] __device__(size_t i) { act[i] = h1[i] * device_sigmoid(h1[i]) * h3[i]; });
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
  for_each_index(nf, [=] __device__(size_t i) {
    const T sg = device_sigmoid(h1[i]);
    const T dact = dh1[i];
    dh3[i] = dact * h1[i] * sg;
    dh1[i] = dact * h3[i] * sg * (T(1) + h1[i] * (T(1) - sg));
  });
  gemm<T>(true, false, D, F, n, T(1), x, D, dh1, F, T(1), dw1, F);
  gemm<T>(true, false, D, F, n, T(1), x, D, dh3, F, T(1), dw3, F);
  gemm<T>(false, true, n, D, F, T(1), dh1, F, w1, F, T(0), dx, D);
  gemm<T>(false, true, n, D, F, T(1), dh3, F, w3, F, T(1), dx, D);
}

namespace {

using kernel_util::GemmProblem;

// One row-major product C = op(A) op(B) + beta C (alpha 1) for gemm_grouped.
GemmProblem product(bool trans_a, bool trans_b, int m, int n, int k, const float* a, int lda,
                    const float* b, int ldb, float beta, float* c, int ldc) {
  GemmProblem p;
  p.trans_a = trans_a;
  p.trans_b = trans_b;
  p.m = m;
  p.n = n;
  p.k = k;
  p.alpha = 1.0f;
  p.a = a;
  p.lda = lda;
  p.b = b;
  p.ldb = ldb;
  p.beta = beta;
  p.c = c;
  p.ldc = ldc;
  return p;
}

// An expert that has rows: its index, its first row and its number of rows. Experts without rows
// get no product at all (the per-expert loop returns before its first one: the weight gradients'
// += of nothing).
struct ExpertRows {
  int e;
  int64_t r0;
  int n;
};
std::vector<ExpertRows> experts_with_rows(const int64_t* offset, int E) {
  std::vector<ExpertRows> experts;
  for (int e = 0; e < E; ++e) {
    const int n = static_cast<int>(offset[e + 1] - offset[e]);
    if (n > 0) experts.push_back({e, offset[e], n});
  }
  return experts;
}

void run(const std::vector<GemmProblem>& products) {
  kernel_util::gemm_grouped(products.data(), static_cast<int>(products.size()));
}

// The elementwise SwiGLU over the experts' rows [offset[0], offset[E]) (offset on the device; rows
// bounds offset[E]): act = silu(h1) h3, and its backward, which turns dh1 (holding dact) into dh1
// and writes dh3. Elements outside the experts are left as they are.
template <typename T>
void swiglu_activation(T* act, const T* h1, const T* h3, const int64_t* offset, int E, int64_t rows,
                       int F) {
  for_each_index(static_cast<size_t>(rows) * F, [=] __device__(size_t i) {
    if (i < static_cast<size_t>(offset[0]) * F || i >= static_cast<size_t>(offset[E]) * F) return;
    act[i] = h1[i] * device_sigmoid(h1[i]) * h3[i];
  });
}
template <typename T>
void swiglu_activation_backward(T* dh1, T* dh3, const T* h1, const T* h3, const int64_t* offset,
                                int E, int64_t rows, int F) {
  for_each_index(static_cast<size_t>(rows) * F, [=] __device__(size_t i) {
    if (i < static_cast<size_t>(offset[0]) * F || i >= static_cast<size_t>(offset[E]) * F) return;
    const T sg = device_sigmoid(h1[i]);
    const T dact = dh1[i];
    dh3[i] = dact * h1[i] * sg;
    dh1[i] = dact * h3[i] * sg * (T(1) + h1[i] * (T(1) - sg));
  });
}

// The experts' FLOPs, counted where their sizes are: every product charges 2·N·K (kRows) or
// 2·M·N (kWeights) per row of the experts, and the rows are offset[E] − offset[0] on the device.
// A counter per FlopKind in device memory (on the device current at first use), which a one-
// thread kernel adds to in stream order and ops::gemm_flops() reads (ops.h DeviceFlopCounter),
// so the measured counts are the CPU's without the offsets coming to the host.
class ExpertFlops final : public DeviceFlopCounter {
 public:
  ExpertFlops() {
    LOOPMOE_CUDA_CHECK(cudaMalloc(&counts_, sizeof(unsigned long long) * kKinds));
    LOOPMOE_CUDA_CHECK(cudaMemset(counts_, 0, sizeof(unsigned long long) * kKinds));
    register_device_flop_counter(this);
  }
  uint64_t read(FlopKind kind) override {
    unsigned long long value = 0;
    kernel_util::to_host(&value, counts_ + static_cast<int>(kind), 1);
    return value;
  }
  void reset() override {
    LOOPMOE_CUDA_CHECK(cudaMemset(counts_, 0, sizeof(unsigned long long) * kKinds));
  }
  unsigned long long* count(FlopKind kind) { return counts_ + static_cast<int>(kind); }

 private:
  static constexpr int kKinds = static_cast<int>(FlopKind::kCount);
  unsigned long long* counts_ = nullptr;
};
ExpertFlops& expert_flops() {
  static ExpertFlops* flops = new ExpertFlops;  // never destroyed, like the cuBLAS handle
  return *flops;
}
__global__ void charge_rows_kernel(unsigned long long* count, const int64_t* offset, int E,
                                   unsigned long long per_row) {
  *count += static_cast<unsigned long long>(offset[E] - offset[0]) * per_row;
}
void charge_expert_rows(const int64_t* offset, int E, uint64_t per_row) {
  if (!flops_charged_now() || per_row == 0) return;
  charge_rows_kernel<<<1, 1>>>(expert_flops().count(current_flop_kind()), offset, E, per_row);
  LOOPMOE_CUDA_CHECK_LAUNCH();
}

// bf16 (train.precision = "bf16"): the experts' products of each kind in one launch of
// expert_gemm.cuh's tensor-core kernel, which rounds the fp32 operands to bf16 as it loads them
// (the maths of gemm's bf16 path, without its conversion pass per operand and call per product)
// and reads the offsets on the device: nothing of the layout comes to the host. `rows` bounds
// the experts' rows for the grid (blocks past the last expert's last tile return at once).
void expert_products(const expert_gemm::Problem& p, int64_t rows) {
  charge_expert_rows(p.offset, p.E,
                     p.kind == expert_gemm::Kind::kRows ? 2ull * p.N * p.K : 2ull * p.M * p.N);
  const expert_gemm::Grid grid = expert_gemm::grid_for(p, rows);
  if (grid.x == 0 || grid.y == 0) return;
  if (grid.y > 65535) {
    throw std::runtime_error("experts: " + std::to_string(grid.y) +
                             " tiles of expert weights are above the grid limit of 65535");
  }
  expert_gemm::expert_gemm_kernel<<<dim3(grid.x, grid.y), expert_gemm::kThreads,
                                    expert_gemm::smem_floats() * sizeof(float)>>>(p);
  LOOPMOE_CUDA_CHECK_LAUNCH();
}

// kRows: C[rows] = A[rows] op(B_e) + beta C[rows], B_e at b + e·D·F.
expert_gemm::Problem row_products(const int64_t* offset, int E, bool trans_b, int N, int K,
                                  const float* a, const float* b, int ldb, float beta, float* c) {
  expert_gemm::Problem p;
  p.kind = expert_gemm::Kind::kRows;
  p.trans_b = trans_b;
  p.E = E;
  p.N = N;
  p.K = K;
  p.offset = offset;
  p.a = a;
  p.lda = K;
  p.b = b;
  p.ldb = ldb;
  p.stride_b = static_cast<long long>(N) * K;
  p.c = c;
  p.ldc = N;
  p.beta = beta;
  return p;
}

// kWeights: C_e += A[rows of e]ᵀ B[rows of e], C_e (M × N) at c + e·M·N.
expert_gemm::Problem weight_products(const int64_t* offset, int E, int M, int N, const float* a,
                                     const float* b, float* c) {
  expert_gemm::Problem p;
  p.kind = expert_gemm::Kind::kWeights;
  p.E = E;
  p.M = M;
  p.N = N;
  p.offset = offset;
  p.a = a;
  p.lda = M;
  p.b = b;
  p.ldb = N;
  p.c = c;
  p.ldc = N;
  p.stride_c = static_cast<long long>(M) * N;
  p.beta = 1.f;
  return p;
}

}  // namespace

// The grouped experts: every product of one kind for all experts in one grouped GEMM (per expert
// the same product, operands and order of += as swiglu_forward / swiglu_backward, so the same
// maths; only cuBLAS's accumulation order inside a product may differ), and the elementwise
// SwiGLU parts once over all rows, which are contiguous in expert order (an elementwise kernel
// gives each element the same bits whatever the rows around it). Deterministic as gemm is: the
// same offsets give the same grouped calls, cuBLAS gives the same bits run to run for the same
// call on one stream, GPU model and library version (the assumption ops_cuda.h makes of every
// cuBLAS product), and the elementwise kernels write each element once, without atomics.
//
// The offsets are on the device (ops.h). bf16 runs on expert_gemm.cuh's kernel, which reads them
// there; fp32 runs on cuBLAS's grouped products, which take every product's sizes on the host, so
// the fp32 path copies the E + 1 offsets back first: a wait for the device per call, the price of
// cuBLAS's fp32 kernels on the parity path (bf16 is the one for speed).
namespace {
std::vector<int64_t> host_offsets(const int64_t* offset, int E) {
  std::vector<int64_t> host(static_cast<size_t>(E) + 1);
  kernel_util::to_host(host.data(), offset, host.size());
  return host;
}
}  // namespace

template <typename T>
void experts_swiglu_forward(T* out, T* h1, T* h3, T* act, const T* x, const int64_t* offset, int E,
                            int64_t rows, const T* w1, const T* w3, const T* w2, int D, int F) {
  static_assert(std::is_same_v<T, float>, "the CUDA backend is float only");
  if (E == 0 || rows == 0) return;
  if (matmul_precision() == MatmulPrecision::kBf16) {
    expert_products(row_products(offset, E, false, F, D, x, w1, F, 0, h1), rows);
    expert_products(row_products(offset, E, false, F, D, x, w3, F, 0, h3), rows);
    swiglu_activation(act, h1, h3, offset, E, rows, F);
    expert_products(row_products(offset, E, false, D, F, act, w2, D, 0, out), rows);
    return;
  }
  const std::vector<int64_t> host = host_offsets(offset, E);
  const std::vector<ExpertRows> experts = experts_with_rows(host.data(), E);
  if (experts.empty()) return;
  std::vector<GemmProblem> products;
  // h1 = x W1 and h3 = x W3: one group of two per expert (same shape).
  for (const ExpertRows& ex : experts) {
    const size_t wf = static_cast<size_t>(ex.e) * D * F;
    const T* xe = x + ex.r0 * D;
    products.push_back(product(false, false, ex.n, F, D, xe, D, w1 + wf, F, 0, h1 + ex.r0 * F, F));
    products.push_back(product(false, false, ex.n, F, D, xe, D, w3 + wf, F, 0, h3 + ex.r0 * F, F));
  }
  run(products);
  swiglu_activation(act, h1, h3, offset, E, rows, F);
  // out = act W2.
  products.clear();
  for (const ExpertRows& ex : experts) {
    const size_t wf = static_cast<size_t>(ex.e) * D * F;
    products.push_back(
        product(false, false, ex.n, D, F, act + ex.r0 * F, F, w2 + wf, D, 0, out + ex.r0 * D, D));
  }
  run(products);
}

template <typename T>
void experts_swiglu_backward(T* dx, T* dw1, T* dw3, T* dw2, T* scratch, const T* dout, const T* x,
                             const T* h1, const T* h3, const T* act, const int64_t* offset, int E,
                             int64_t rows, const T* w1, const T* w3, const T* w2, int D, int F) {
  static_assert(std::is_same_v<T, float>, "the CUDA backend is float only");
  if (E == 0 || rows == 0) return;
  // scratch (2 * rows * F values, ops.h): dh1 of row r at dh1 + r * F, then dh3 likewise, so that
  // the elementwise part runs once over all rows.
  T* dh1 = scratch;
  T* dh3 = scratch + static_cast<size_t>(rows) * F;
  if (matmul_precision() == MatmulPrecision::kBf16) {
    // The products of the fp32 path below, one launch per kind, in the same order.
    expert_products(weight_products(offset, E, F, D, act, dout, dw2), rows);
    expert_products(row_products(offset, E, true, F, D, dout, w2, D, 0, dh1), rows);
    swiglu_activation_backward(dh1, dh3, h1, h3, offset, E, rows, F);
    expert_products(weight_products(offset, E, D, F, x, dh1, dw1), rows);
    expert_products(weight_products(offset, E, D, F, x, dh3, dw3), rows);
    expert_products(row_products(offset, E, true, D, F, dh1, w1, F, 0, dx), rows);
    expert_products(row_products(offset, E, true, D, F, dh3, w3, F, 1, dx), rows);
    return;
  }
  const std::vector<int64_t> host = host_offsets(offset, E);
  const std::vector<ExpertRows> experts = experts_with_rows(host.data(), E);
  if (experts.empty()) return;
  std::vector<GemmProblem> products;
  // dW2 += act^T dout, and dact = dout W2^T into dh1 (independent: one call).
  for (const ExpertRows& ex : experts) {
    const size_t wf = static_cast<size_t>(ex.e) * D * F;
    products.push_back(
        product(true, false, F, D, ex.n, act + ex.r0 * F, F, dout + ex.r0 * D, D, 1, dw2 + wf, D));
  }
  for (const ExpertRows& ex : experts) {
    const size_t wf = static_cast<size_t>(ex.e) * D * F;
    products.push_back(
        product(false, true, ex.n, F, D, dout + ex.r0 * D, D, w2 + wf, D, 0, dh1 + ex.r0 * F, F));
  }
  run(products);
  swiglu_activation_backward(dh1, dh3, h1, h3, offset, E, rows, F);
  // dW1 += x^T dh1 and dW3 += x^T dh3 (a group of two per expert), dx = dh1 W1^T.
  products.clear();
  for (const ExpertRows& ex : experts) {
    const size_t wf = static_cast<size_t>(ex.e) * D * F;
    const T* xe = x + ex.r0 * D;
    products.push_back(product(true, false, D, F, ex.n, xe, D, dh1 + ex.r0 * F, F, 1, dw1 + wf, F));
    products.push_back(product(true, false, D, F, ex.n, xe, D, dh3 + ex.r0 * F, F, 1, dw3 + wf, F));
  }
  for (const ExpertRows& ex : experts) {
    const size_t wf = static_cast<size_t>(ex.e) * D * F;
    products.push_back(
        product(false, true, ex.n, D, F, dh1 + ex.r0 * F, F, w1 + wf, F, 0, dx + ex.r0 * D, D));
  }
  run(products);
  // dx += dh3 W3^T: after dx = dh1 W1^T (it adds to that C, so not in the same call).
  products.clear();
  for (const ExpertRows& ex : experts) {
    const size_t wf = static_cast<size_t>(ex.e) * D * F;
    products.push_back(
        product(false, true, ex.n, D, F, dh3 + ex.r0 * F, F, w3 + wf, F, 1, dx + ex.r0 * D, D));
  }
  run(products);
}

namespace kernel_util {

void experts_swiglu_forward_reference(float* out, float* h1, float* h3, float* act, const float* x,
                                      const int64_t* offset, int E, const float* w1,
                                      const float* w3, const float* w2, int D, int F) {
  // Experts one after another on the stream: each product has one expert's rows, in their order.
  for (int e = 0; e < E; ++e) {
    const int64_t r0 = offset[e];
    const int n = static_cast<int>(offset[e + 1] - r0);
    const size_t wf = static_cast<size_t>(e) * D * F;
    cuda::swiglu_forward(out + r0 * D, h1 + r0 * F, h3 + r0 * F, act + r0 * F, x + r0 * D, w1 + wf,
                         w3 + wf, w2 + wf, n, D, F);
  }
}

void experts_swiglu_backward_reference(float* dx, float* dw1, float* dw3, float* dw2,
                                       float* scratch, const float* dout, const float* x,
                                       const float* h1, const float* h3, const float* act,
                                       const int64_t* offset, int E, const float* w1,
                                       const float* w3, const float* w2, int D, int F) {
  for (int e = 0; e < E; ++e) {
    const int64_t r0 = offset[e];
    const int n = static_cast<int>(offset[e + 1] - r0);
    const size_t wf = static_cast<size_t>(e) * D * F;
    cuda::swiglu_backward(dx + r0 * D, dw1 + wf, dw3 + wf, dw2 + wf, scratch + 2 * r0 * F,
                          dout + r0 * D, x + r0 * D, h1 + r0 * F, h3 + r0 * F, act + r0 * F,
                          w1 + wf, w3 + wf, w2 + wf, n, D, F);
  }
}

}  // namespace kernel_util

void moe_rows_by_expert(int64_t* row_of_slot, int64_t* offset, const int32_t* expert,
                        const uint8_t* kept, const int64_t* received, size_t slots, int E) {
  if (E == 0) {
    LOOPMOE_CUDA_CHECK(cudaMemsetAsync(offset, 0, sizeof(int64_t), cudaStreamLegacy));
    return;
  }
  expert_rows::rows_by_expert_kernel<<<E, expert_rows::kThreads,
                                       expert_rows::kSharedFloats * sizeof(float)>>>(
      row_of_slot, offset, expert, kept, received, slots, E);
  LOOPMOE_CUDA_CHECK_LAUNCH();
}

void moe_capacity_keep(uint8_t* kept, int64_t* received, const int32_t* expert,
                       const int64_t* preceding, int64_t capacity, size_t slots, int E) {
  if (E == 0) return;
  expert_rows::capacity_keep_kernel<<<E, expert_rows::kThreads,
                                      expert_rows::kSharedFloats * sizeof(float)>>>(
      kept, received, expert, preceding, capacity, slots);
  LOOPMOE_CUDA_CHECK_LAUNCH();
}

template <typename T>
void moe_permute_forward(T* rows, const T* x, const int64_t* row_of_slot, size_t slots, int k,
                         int D) {
  for_each_index(slots * D, [=] __device__(size_t idx) {
    const size_t slot = idx / D, i = idx % D;
    const int64_t r = row_of_slot[slot];
    if (r >= 0) rows[static_cast<size_t>(r) * D + i] = x[(slot / k) * D + i];
  });
}

template <typename T>
void moe_permute_backward(T* dx, const T* drows, const int64_t* row_of_slot, int S, int k, int D) {
  // One thread per (token, column): the token's kept slots added in slot order, as on the CPU.
  for_each_index(static_cast<size_t>(S) * D, [=] __device__(size_t idx) {
    const size_t t = idx / D, i = idx % D;
    T acc = dx[idx];
    for (int j = 0; j < k; ++j) {
      const int64_t r = row_of_slot[t * k + j];
      if (r >= 0) acc += drows[static_cast<size_t>(r) * D + i];
    }
    dx[idx] = acc;
  });
}

template <typename T>
void moe_unpermute_forward(T* out, const T* rows, const int64_t* row_of_slot, size_t slots, int D) {
  for_each_index(slots * D, [=] __device__(size_t idx) {
    const size_t slot = idx / D, i = idx % D;
    const int64_t r = row_of_slot[slot];
    out[idx] = r >= 0 ? rows[static_cast<size_t>(r) * D + i] : T(0);
  });
}

template <typename T>
void moe_unpermute_backward(T* drows, const T* dout, const int64_t* row_of_slot, size_t slots,
                            int D) {
  cuda::moe_permute_forward(drows, dout, row_of_slot, slots, 1, D);
}

template <typename T>
void gather_rows(T* dst, const T* src, const int64_t* index, int64_t rows, int D) {
  for_each_index(static_cast<size_t>(rows) * D, [=] __device__(size_t idx) {
    const size_t r = idx / D, i = idx % D;
    dst[idx] = src[static_cast<size_t>(index[r]) * D + i];
  });
}

template <typename T>
void scatter_rows(T* dst, const T* src, const int64_t* index, int64_t rows, int D) {
  for_each_index(static_cast<size_t>(rows) * D, [=] __device__(size_t idx) {
    const size_t r = idx / D, i = idx % D;
    dst[static_cast<size_t>(index[r]) * D + i] = src[idx];
  });
}

template <typename T>
void moe_combine_forward(T* y, const T* expert_out, const T* weight, const uint8_t* kept, int S,
                         int k, int D) {
  // One thread per (token, column): kept slots added in slot order from 0, as on the CPU.
  for_each_index(static_cast<size_t>(S) * D, [=] __device__(size_t idx) {
    const size_t t = idx / D, i = idx % D;
    T acc = 0;
    for (int j = 0; j < k; ++j) {
      const size_t slot = t * k + j;
      if (kept[slot]) acc += weight[slot] * expert_out[slot * D + i];
    }
    y[idx] = acc;
  });
}

namespace {
// One block per slot. dweight = dy · expert_out: each thread's products in column order, then
// block_sum's fixed tree.
template <typename T>
__global__ void moe_combine_backward_kernel(T* dexpert_out, T* dweight, const T* dy,
                                            const T* expert_out, const T* weight,
                                            const uint8_t* kept, int k, int D) {
  __shared__ T shared[32];
  const size_t slot = blockIdx.x;
  const T* g = dy + (slot / k) * D;
  T* d = dexpert_out + slot * D;
  if (!kept[slot]) {  // the same branch for the whole block, so block_sum is not skipped by some
    for (int i = threadIdx.x; i < D; i += blockDim.x) d[i] = T(0);
    if (threadIdx.x == 0) dweight[slot] = T(0);
    return;
  }
  const T* o = expert_out + slot * D;
  const T w = weight[slot];
  T dot = 0;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    dot += g[i] * o[i];
    d[i] = w * g[i];
  }
  dot = block_sum(dot, shared);
  if (threadIdx.x == 0) dweight[slot] = dot;
}

// One thread per token (k and E are small): the CPU's loops as they are.
template <typename T>
__global__ void router_topk_forward_kernel(int32_t* expert, T* weight, const T* probs, int S, int E,
                                           int k, bool renormalize) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= S) return;
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

template <typename T>
__global__ void router_topk_backward_kernel(T* dprobs, const T* dweight, const T* probs,
                                            const int32_t* expert, const T* weight, const T* bias,
                                            int S, int E, int k, bool renormalize) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= S) return;
  const T* p = probs + static_cast<size_t>(t) * E;
  T* dp = dprobs + static_cast<size_t>(t) * E;
  const int32_t* ex = expert + static_cast<size_t>(t) * k;
  const T* w = weight + static_cast<size_t>(t) * k;
  const T* dw = dweight + static_cast<size_t>(t) * k;
  for (int e = 0; e < E; ++e) dp[e] = T(0);
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
}  // namespace

template <typename T>
void moe_combine_backward(T* dexpert_out, T* dweight, const T* dy, const T* expert_out,
                          const T* weight, const uint8_t* kept, int S, int k, int D) {
  const size_t slots = static_cast<size_t>(S) * k;
  if (slots == 0) return;
  moe_combine_backward_kernel<<<static_cast<unsigned>(slots), kernel_util::row_threads(D)>>>(
      dexpert_out, dweight, dy, expert_out, weight, kept, k, D);
  LOOPMOE_CUDA_CHECK_LAUNCH();
}

template <typename T>
void router_topk_forward(int32_t* expert, T* weight, const T* probs, int S, int E, int k,
                         bool renormalize) {
  if (S <= 0) return;
  constexpr int kRowsPerBlock = 128;
  router_topk_forward_kernel<<<(S + kRowsPerBlock - 1) / kRowsPerBlock, kRowsPerBlock>>>(
      expert, weight, probs, S, E, k, renormalize);
  LOOPMOE_CUDA_CHECK_LAUNCH();
}

template <typename T>
void router_topk_backward(T* dprobs, const T* dweight, const T* probs, const int32_t* expert,
                          const T* weight, const T* bias, int S, int E, int k, bool renormalize) {
  if (S <= 0) return;
  constexpr int kRowsPerBlock = 128;
  router_topk_backward_kernel<<<(S + kRowsPerBlock - 1) / kRowsPerBlock, kRowsPerBlock>>>(
      dprobs, dweight, probs, expert, weight, bias, S, E, k, renormalize);
  LOOPMOE_CUDA_CHECK_LAUNCH();
}

// LossSum is FixedSum's layout, so the kernel writes the ops.h outputs directly.
static_assert(sizeof(LossSum) == sizeof(router::FixedSum) && offsetof(LossSum, units) == 0 &&
                  offsetof(LossSum, invalid) == offsetof(router::FixedSum, invalid),
              "LossSum and router::FixedSum must share their layout");

template <typename T>
void router_stats(int64_t* assigned, LossSum* prob_sum, LossSum* lse_sq_sum, const int32_t* expert,
                  const T* probs, const T* lse, int S, int E, int k) {
  // In fixed point on the device (router_stats.cuh: the CPU's units exactly); the results stay
  // there until the router's caller copies them back once per step.
  static_assert(std::is_same_v<T, float>, "the CUDA backend is float only");
  static_assert(sizeof(long long) == sizeof(int64_t), "assigned is written as long long");
  router::router_stats_kernel<<<E + 1, router::kThreads, router::kSharedFloats * sizeof(float)>>>(
      reinterpret_cast<router::FixedSum*>(prob_sum),
      reinterpret_cast<router::FixedSum*>(lse_sq_sum), reinterpret_cast<long long*>(assigned),
      expert, probs, lse, S, E, k);
  LOOPMOE_CUDA_CHECK_LAUNCH();
}

template <typename T>
void router_balance_bias(T* bias, const int64_t* assigned, int E, int k, double tokens,
                         double aux_scale) {
  // The CPU's expression, term by term in double (products and quotients only: nothing for the
  // compiler to contract, so the same bits).
  for_each_index(static_cast<size_t>(E), [=] __device__(size_t e) {
    bias[e] =
        static_cast<T>(aux_scale * E * (static_cast<double>(assigned[e]) / (tokens * k)) / tokens);
  });
}

template <typename T>
void router_zloss_backward(T* dlogits, const T* probs, const T* lse, int S, int E, double z_scale,
                           double tokens) {
  for_each_index(static_cast<size_t>(S) * E, [=] __device__(size_t idx) {
    const T c = static_cast<T>(z_scale * 2.0 * lse[idx / E] / tokens);
    dlogits[idx] += c * probs[idx];
  });
}

// This file's entries of model/ops_list.h.
LOOPMOE_OPS_MOE(LOOPMOE_OPS_INSTANTIATE, float)

}  // namespace loopmoe::model::ops::cuda
