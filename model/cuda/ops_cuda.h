// The CUDA backend of model/ops.h (issue 9, kernel part): the same functions with the same
// signatures in namespace loopmoe::model::ops::cuda, on device pointers (cudaMalloc memory, e.g. a
// Device::kCuda Buffer's data()) unless a comment here or in ops.h says "host". The maths and the
// accumulate/overwrite contract of each function are those of its ops.h declaration; this header
// lists what differs. Plain C++ (no CUDA types), so host code and tests include it.
//
// STATUS: compiled with nvcc for sm_90a; NOT YET RUN ON A GPU. tests/cuda/ compares every function
// here with its CPU version and runs it twice for identical bits; those tests skip without a
// device. Do not rely on these kernels before a session with a GPU has run tests/cuda.
//
// Float only (training); the double gradient checks stay on the CPU. Every call is issued on the
// default stream and returns without waiting, except those that return or fill host values
// (crossentropy_forward*, sum_squares, router_stats), which synchronise by copying back.
//
// Numerics: run to run the bits are identical (no floating-point atomics; every reduction has a
// fixed order, written where it is implemented; cuBLAS guarantees the same for its products on
// one stream, the same GPU model and the same library version). They are NOT the CPU's bits: the
// CPU's fast-math vectorised sums, its Cephes exp and its sgemm fma chains differ from the GPU's
// block-tree sums, expf and cuBLAS, so CPU and GPU agree to rounding (~1e-5 relative elementwise,
// ~1e-4 for reductions). Batch invariance (docs/MODEL.md) holds for the row kernels (a row's
// reduction order depends on its width only) but NOT for gemm: cuBLAS may pick a different
// algorithm (e.g. split-K) for a different m, so rows of a sub-call can differ from the same rows
// of the full call. Column sums over rows (weight and bias gradients) are chunked from each
// gradient group's first row, so a data-parallel worker holding whole groups sums them exactly as
// one process would. The FLOP counters of ops.h are not charged by gemm here (ops_gemm.cc keeps
// them private).
//
// Host pointers in a CUDA call are only those ops.h marks "host" (tree_sum_groups' ranges,
// experts' offset, router_stats' outputs) plus the GradGroups descriptors themselves.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "model/ops.h"

namespace loopmoe::model::ops::cuda {

// Host: ranges. buffers on the device. Same fixed pairwise tree as the CPU (bit-identical).
template <typename T>
void tree_sum_groups(T* base, size_t stride, int groups,
                     const std::vector<std::pair<size_t, size_t>>& ranges);

// cuBLAS sgemm, fp32, CUBLAS_DEFAULT_MATH (no TF32). Row-major through the transpose trick: a
// row-major [M,N] matrix with leading dimension ld is the column-major [N,M] matrix with the same
// ld, so C = op(A) op(B) (row-major) is computed as C^T = op(B)^T op(A)^T in column-major, i.e.
// cublasSgemm(op_b, op_a, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc). beta == 0: C not read.
template <typename T>
void gemm(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a, int lda, const T* b,
          int ldb, T beta, T* c, int ldc);

template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* wte, int S, int D);
// The rows sorted by token (CUB's stable radix sort), then one thread per (distinct token, column)
// adds that token's rows in increasing row order: the CPU's order exactly, so its bits, and no
// atomics. Uses the backend's workspace.
template <typename T>
void embedding_backward(T* dwte, const T* dout, const int32_t* tokens, int S, int D);
template <typename T>
void embedding_backward(const GradGroups<T>& dwte, const T* dout, const int32_t* tokens, int D);

template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int S, int D);
template <typename T>
void rmsnorm_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight,
                      const T* rstd, int S, int D);
template <typename T>
void rmsnorm_weight_backward(const GradGroups<T>& dweight, const T* dout, const T* inp,
                             const T* rstd, int D);

template <typename T>
void matmul_forward(T* out, const T* inp, const T* w, const T* bias, int S, int I, int O);
template <typename T>
void matmul_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* inp, const T* w, int S,
                     int I, int O);
// dbias: host pointer to the GradGroups descriptor (its buffers are on the device), as on the CPU.
template <typename T>
void matmul_backward(T* dinp, const GradGroups<T>& dw, const GradGroups<T>* dbias, const T* dout,
                     const T* inp, const T* w, int I, int O);

template <typename T>
void silu_forward(T* out, const T* inp, size_t n);
template <typename T>
void silu_backward(T* dinp, const T* dout, const T* inp, size_t n);

template <typename T>
void adaln_modulate_forward(T* u, const T* n, const T* m, int S, int D);
template <typename T>
void adaln_modulate_backward(T* dn, T* dm, const T* du, const T* n, const T* m, int S, int D);

template <typename T>
void gated_residual_forward(T* x, const T* y, const T* m, int S, int D);
template <typename T>
void gated_residual_backward(T* dy, T* dm, const T* dx, const T* y, const T* m, int S, int D);

// pe: device. Computed on the host in double exactly as the CPU does and copied (bit-identical).
template <typename T>
void iteration_encoding(T* pe, int r, int dc);

template <typename T>
void rope_forward(T* qkv, const T* cos_t, const T* sin_t, int B, int T_, int H, int hd);
template <typename T>
void rope_backward(T* dqkv, const T* cos_t, const T* sin_t, int B, int T_, int H, int hd);
// cos_t, sin_t: device. Computed on the host as the CPU does and copied (bit-identical).
template <typename T>
void rope_tables(T* cos_t, T* sin_t, int T_, int hd, double theta);

// Causal attention as the CPU does it (scores by cuBLAS, row softmax, P·V by cuBLAS; batched over
// heads, one cuBLAS call per sequence). `scratch` is NOT used: the backward keeps dP for all H
// heads of a sequence (H·T·T values) in the backend's own workspace, so a caller's T·T-per-thread
// scratch of the CPU contract is never overrun. May be nullptr.
template <typename T>
void attention_forward(T* out, T* att, const T* qkv, int B, int T_, int H, int hd);
template <typename T>
void attention_backward(T* dqkv, T* scratch, const T* dout, const T* qkv, const T* att, int B,
                        int T_, int H, int hd);

template <typename T>
void softmax_forward(T* probs, T* lse, const T* logits, int S, int E);
template <typename T>
void softmax_backward(T* dlogits, const T* dprobs, const T* probs, int S, int E);

// The rows' losses are computed on the device in double, copied to the host and added there in
// row order (LossSum: exactly; the mean: as the CPU does). Synchronises.
template <typename T>
LossSum crossentropy_forward_sum(T* probs, const T* logits, const int32_t* targets, int S, int V);
template <typename T>
double crossentropy_forward(T* probs, const T* logits, const int32_t* targets, int S, int V);
template <typename T>
void crossentropy_backward(T* dlogits, const T* probs, const int32_t* targets, T scale, int S,
                           int V);

template <typename T>
void swiglu_forward(T* out, T* h1, T* h3, T* act, const T* x, const T* w1, const T* w3, const T* w2,
                    int n, int D, int F);
template <typename T>
void swiglu_backward(T* dx, T* dw1, T* dw3, T* dw2, T* scratch, const T* dout, const T* x,
                     const T* h1, const T* h3, const T* act, const T* w1, const T* w3, const T* w2,
                     int n, int D, int F);
// offset: host [E+1], as on the CPU. One cuBLAS product per expert and matrix, experts in order
// (a grouped GEMM is the obvious next step).
template <typename T>
void experts_swiglu_forward(T* out, T* h1, T* h3, T* act, const T* x, const int64_t* offset, int E,
                            const T* w1, const T* w3, const T* w2, int D, int F);
template <typename T>
void experts_swiglu_backward(T* dx, T* dw1, T* dw3, T* dw2, T* scratch, const T* dout, const T* x,
                             const T* h1, const T* h3, const T* act, const int64_t* offset, int E,
                             const T* w1, const T* w3, const T* w2, int D, int F);

template <typename T>
void moe_permute_forward(T* rows, const T* x, const int64_t* row_of_slot, size_t slots, int k,
                         int D);
template <typename T>
void moe_permute_backward(T* dx, const T* drows, const int64_t* row_of_slot, int S, int k, int D);
template <typename T>
void moe_unpermute_forward(T* out, const T* rows, const int64_t* row_of_slot, size_t slots, int D);
template <typename T>
void moe_unpermute_backward(T* drows, const T* dout, const int64_t* row_of_slot, size_t slots,
                            int D);
template <typename T>
void gather_rows(T* dst, const T* src, const int64_t* index, int64_t rows, int D);
template <typename T>
void scatter_rows(T* dst, const T* src, const int64_t* index, int64_t rows, int D);

template <typename T>
void moe_combine_forward(T* y, const T* expert_out, const T* weight, const uint8_t* kept, int S,
                         int k, int D);
template <typename T>
void moe_combine_backward(T* dexpert_out, T* dweight, const T* dy, const T* expert_out,
                          const T* weight, const uint8_t* kept, int S, int k, int D);

template <typename T>
void router_topk_forward(int32_t* expert, T* weight, const T* probs, int S, int E, int k,
                         bool renormalize);
template <typename T>
void router_topk_backward(T* dprobs, const T* dweight, const T* probs, const int32_t* expert,
                          const T* weight, const T* bias, int S, int E, int k, bool renormalize);
// assigned, prob_sum, lse_sq_sum: host (as in ops.h); expert, probs, lse: device. Copies its
// inputs to the host and runs the CPU version there (fixed point, exact). Synchronises.
template <typename T>
void router_stats(int64_t* assigned, LossSum* prob_sum, LossSum* lse_sq_sum, const int32_t* expert,
                  const T* probs, const T* lse, int S, int E, int k);
template <typename T>
void router_zloss_backward(T* dlogits, const T* probs, const T* lse, int S, int E, double z_scale,
                           double tokens);

template <typename T>
void add_row_vector(T* x, const T* v, int S, int D);
// Column sums in the chunked order of cuda_util.cuh column_sums (not the CPU's plain row order).
template <typename T>
void sum_rows(T* out, const T* x, int rows, int D);
template <typename T>
void add_inplace(T* dst, const T* src, size_t n);
template <typename T>
void copy_masked_rows(T* x, const T* src, const int32_t* mask, int S, int D);
template <typename T>
void halt_converged_rows(int32_t* halted_at, T* frozen, const T* prev, const T* cur, int S, int D,
                         double threshold, int iteration);

// The CPU's 4096-element blocks, each summed by a block tree; the block partials summed by a
// second fixed tree (not the CPU's serial order). Synchronises (returns a host double).
double sum_squares(const float* g, size_t n);
void scale_inplace(float* g, size_t n, float c);
void adamw_update(float* p, float* m, float* v, const float* g, const uint8_t* decay, size_t n,
                  const AdamWStep& step);

}  // namespace loopmoe::model::ops::cuda
