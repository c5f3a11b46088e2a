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
// - attention_forward, attention_backward: as the CPU does it (scores by cuBLAS, row softmax, P·V
//   by cuBLAS; batched over heads, one cuBLAS call per sequence). `scratch` is NOT used: the
//   backward keeps dP for all H heads of a sequence (H·T·T values) in the backend's own workspace,
//   so a caller's T·T-per-thread scratch of the CPU contract is never overrun. May be nullptr.
// - crossentropy_forward_sum, crossentropy_forward: the rows' losses are computed on the device in
//   double, copied to the host and added there in row order (LossSum: exactly; the mean: as the
//   CPU does). Synchronises.
// - experts_swiglu_forward, experts_swiglu_backward: offset on the host [E+1], as on the CPU. One
//   cuBLAS product per expert and matrix, experts in order (a grouped GEMM is the obvious next
//   step).
// - router_stats: assigned, prob_sum, lse_sq_sum on the host (as in ops.h); expert, probs, lse on
//   the device. Copies its inputs to the host and runs the CPU version there (fixed point,
//   exact). Synchronises.
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
}  // namespace kernel_util

}  // namespace loopmoe::model::ops::cuda
