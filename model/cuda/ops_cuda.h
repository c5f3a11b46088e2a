// The CUDA backend of model/ops.h (issue 9, kernel part): the same functions with the same
// signatures in namespace loopmoe::model::ops::cuda, on device pointers (cudaMalloc memory, e.g. a
// Device::kCuda Buffer's data()) unless a comment here or in ops.h says "host". The maths and the
// accumulate/overwrite contract of each function are those of its ops.h declaration; the
// declarations are generated from model/ops_list.h (as model/cpu/ops_cpu.h's are), and this
// header lists what differs. Plain C++ (no CUDA types), so host code and tests include it.
//
// STATUS: compiled with nvcc for sm_90a; NOT YET RUN ON A GPU. tests/cuda/ compares every function
// here with its CPU version and runs it twice for identical bits; those tests skip without a
// device. Do not rely on these kernels before a session with a GPU has run tests/cuda.
//
// Float only (training); the double gradient checks stay on the CPU. Every call is issued on the
// default stream and returns without waiting, except those that return or fill host values
// (crossentropy_forward*, sum_squares) and the fp32 experts (their offsets), which synchronise by
// copying back.
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
// one process would. The FLOP counters of ops.h are charged as the CPU charges them
// (ops::charge_gemm_flops: every cuBLAS product 2·m·n·k, the fused attention the products of the
// CPU's, recomputed scores nothing), so the measured counts are the same integers on both.
//
// Host pointers in a CUDA call are only those ops.h marks "host" (tree_sum_groups' ranges) plus
// the GradGroups descriptors themselves.
//
// What differs from the ops.h contract, function by function:
// - tree_sum_groups: ranges on the host, the buffers on the device. Same fixed pairwise tree as
//   the CPU (bit-identical).
// - gemm: cuBLAS sgemm (loaded at run time, cublas_loader.h), fp32, CUBLAS_DEFAULT_MATH (no TF32).
//   With ops::matmul_precision() == kBf16 (train.precision = "bf16"): the operands converted to
//   bf16 (model/bf16.h's rounding, packed copies in the backend's own device block), then
//   cublasGemmEx with CUBLAS_COMPUTE_32F into the fp32 C; the CPU emulation's values up to the
//   fp32 accumulation order (tests/cuda/test_cuda_bf16.cc).
//   Row-major through the transpose trick: a row-major [M,N] matrix with leading dimension ld is
//   the column-major [N,M] matrix with the same ld, so C = op(A) op(B) (row-major) is computed as
//   C^T = op(B)^T op(A)^T in column-major, i.e. cublasSgemm(op_b, op_a, n, m, k, alpha, b, ldb, a,
//   lda, beta, c, ldc). beta == 0: C not read.
// - embedding_backward: the rows (of each group) sorted by token (CUB's stable radix sort), then
//   one thread per (distinct token, column) adds that token's rows in increasing row order: the
//   CPU's order exactly, so its bits, and no atomics. Uses the backend's workspace.
// - matmul_backward (GradGroups): dbias is a host pointer to the GradGroups descriptor (its
//   buffers are on the device), as on the CPU.
// - iteration_encoding, rope_tables: computed on the host in double exactly as the CPU does and
//   copied to the device (bit-identical).
// - attention_forward, attention_backward: fused (flash) kernels for head_dim <= 128: an online
//   softmax over key tiles of 64, nothing T×T in memory (T up to any length the grid allows), lse
//   saved; the backward recomputes P from lse in two deterministic kernels (dK/dV per key tile,
//   dQ per query tile; no atomics) after D = rowsum(dO ⊙ O). fp32: SIMT arithmetic; bf16: the
//   tensor cores (nvcuda::wmma), operands rounded as gemm rounds them. Above head_dim 128, or with
//   LOOPMOE_CUDA_ATTENTION=materialized, the materialized reference (kernel_util below: the CPU's
//   algorithm with cuBLAS products, P recomputed in the backward, the T×T blocks of one sequence
//   in the backend's workspace). `scratch` is not used (nullptr allowed).
// - crossentropy_forward_sum, crossentropy_forward: the rows' losses are computed on the device in
//   double, copied to the host and added there in row order (LossSum: exactly; the mean: as the
//   CPU does). Synchronises.
// - experts_swiglu_forward, experts_swiglu_backward: offset on the device [E+1], as in ops.h.
//   fp32: the experts' products are grouped GEMMs (kernel_util::gemm_grouped, one
//   cublasGemmGroupedBatchedEx per call: 2 forward, 3 backward per layer, experts with no rows
//   left out), which take their sizes on the host, so this path copies the offsets back first (a
//   wait for the device per call: the price of cuBLAS's fp32 kernels on the parity path). bf16:
//   each kind of product is one launch of model/cuda/expert_gemm.cuh's tensor-core kernel over
//   all experts (operands rounded to bf16 as loaded, fp32 accumulation; 3 forward, 6 backward per
//   layer), which reads the offsets on the device, and the FLOP counters are charged there too
//   (ops.h DeviceFlopCounter: a counter per kind in device memory, read when the counts are), so
//   nothing waits for the device. Both: the SwiGLU elementwise parts are one kernel over the
//   experts' rows; the maths and every product's inputs are the per-expert loop's
//   (kernel_util::experts_swiglu_*_reference, which the tests hold them to). The backward's
//   scratch holds dh1 for all rows, then dh3 (not per expert).
// - moe_rows_by_expert, moe_capacity_keep: one block per expert walks the slots in order and
//   ranks its slots by a block-wide scan (expert_rows.cuh), so kept, received, offset and the rows
//   are the CPU's exactly; no atomics, nothing copied to the host.
// - router_stats: outputs on the device, as in ops.h. Sums in the CPU's fixed point
//   (router_stats.cuh: the same units exactly); LossSum is the kernel's FixedSum layout.
// - router_balance_bias: the CPU's double expression per expert, so the CPU's bits.
// - sum_rows: column sums in the chunked order of cuda_util.cuh column_sums (not the CPU's plain
//   row order).
// - sum_squares: the CPU's 4096-element blocks, each summed by a block tree; the block partials
//   summed by a second fixed tree (not the CPU's serial order). Synchronises (returns a host
//   double).
#pragma once

#include "model/ops.h"
#include "model/ops_list.h"

namespace loopmoe::model::ops::cuda {

LOOPMOE_OPS(LOOPMOE_OPS_DECLARE, T)
LOOPMOE_OPS_FLOAT(LOOPMOE_OPS_DECLARE_FLOAT)

namespace kernel_util {
// `batch` row-major products C_i = alpha op(A_i) op(B_i) + beta C_i with X_i = X + i * stride_x
// (one cublasSgemmStridedBatched call, same transpose trick as gemm; in bf16 one
// cublasGemmStridedBatchedEx on bf16 copies of the operands, as gemm). The attention kernels'
// products; here rather than in cuda_util.cuh so that the tests can call it.
void gemm_strided_batched(bool trans_a, bool trans_b, int m, int n, int k, float alpha,
                          const float* a, int lda, long long stride_a, const float* b, int ldb,
                          long long stride_b, float beta, float* c, int ldc, long long stride_c,
                          int batch);

// One product of gemm_grouped: C = alpha op(A) op(B) + beta C, row-major, gemm's arguments.
struct GemmProblem {
  bool trans_a = false, trans_b = false;
  int m = 0, n = 0, k = 0;
  float alpha = 1;
  const float* a = nullptr;
  int lda = 0;
  const float* b = nullptr;
  int ldb = 0;
  float beta = 0;
  float* c = nullptr;
  int ldc = 0;
};

// Each of problems[0, count) (a host array; the matrices on the device) computed as gemm would
// compute it alone, up to the fp32 accumulation order. The products must be independent: none
// reads or writes a C another one writes. fp32: one cublasGemmGroupedBatchedEx
// (CUBLAS_COMPUTE_32F, no TF32) over all of them, consecutive problems with the same shape,
// leading dimensions and scalars forming one group; its pointer arrays in the backend's own
// device block, written by a kernel queued before the call (stream order keeps the block alive
// until the product has read it; no host synchronisation). bf16 (ops::matmul_precision()):
// problem by problem through gemm, since cuBLAS has no grouped product of bf16 operands into an
// fp32 C (its type table; the library ships bf16 grouped kernels with bf16 output only).
// Problems with m == 0 or n == 0 are skipped; k == 0 ones (C = beta C) go through gemm.
void gemm_grouped(const GemmProblem* problems, int count);

// The naive reference of the grouped experts (llm.c style, kept beside the fast path; the tests
// hold them equal): the per-expert loop, swiglu_forward / swiglu_backward on each expert's rows,
// experts in order (3 and 6 gemm calls per expert). Same contract as experts_swiglu_forward /
// experts_swiglu_backward, except that offset is on the host (no rows bound) and the backward's
// scratch holds each expert's dh1, dh3 at 2 * offset[e] * F.
void experts_swiglu_forward_reference(float* out, float* h1, float* h3, float* act, const float* x,
                                      const int64_t* offset, int E, const float* w1,
                                      const float* w3, const float* w2, int D, int F);
void experts_swiglu_backward_reference(float* dx, float* dw1, float* dw3, float* dw2,
                                       float* scratch, const float* dout, const float* x,
                                       const float* h1, const float* h3, const float* act,
                                       const int64_t* offset, int E, const float* w1,
                                       const float* w3, const float* w2, int D, int F);

// The two attention implementations behind attention_forward/backward (same contract as those;
// the fused ones need head_dim <= 128 and throw std::invalid_argument above). The tests hold
// them to each other and to the CPU.
void attention_forward_fused(float* out, float* lse, const float* qkv, int B, int T_, int H,
                             int hd);
void attention_backward_fused(float* dqkv, const float* dout, const float* qkv, const float* out,
                              const float* lse, int B, int T_, int H, int hd);
void attention_forward_materialized(float* out, float* lse, const float* qkv, int B, int T_, int H,
                                    int hd);
void attention_backward_materialized(float* dqkv, const float* dout, const float* qkv, int B,
                                     int T_, int H, int hd);
}  // namespace kernel_util

}  // namespace loopmoe::model::ops::cuda
