// Batch-invariant single-precision matrix multiply (docs/MODEL.md "Batch-invariant numerics").
//
// Every element of C is computed the same way whatever the shape of the call it is part of:
//   acc = 0; for k = 0 .. K-1: acc = fma(op(A)[i,k], op(B)[k,j], acc)      (in this order)
//   C[i,j] = alpha * acc                      when beta == 0 (C's old value is not read)
//   C[i,j] = alpha * acc + beta * C[i,j]      otherwise (two products, one add; no fma)
// So a row's result does not depend on how many rows share the call, where the row sits in it,
// how the call is split over threads, or which CPU kernel (AVX-512, AVX2, portable) runs it:
// they all produce this value bit for bit. OpenBLAS gives no such guarantee (its Haswell and Zen
// kernels round a row differently depending on the call's row count), and data-parallel workers
// and expert shards see different row counts than a single process does.
#pragma once

namespace loopmoe::model::ops::cpu {

// C[M,N] = alpha * op(A) @ op(B) + beta * C, row-major; op transposes when the flag is set
// (op(A) is M×K: A is M×K with lda >= K, or K×M with lda >= M when transposed).
// Single-threaded; callers split C across threads.
void sgemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda,
           const float* b, int ldb, float beta, float* c, int ldc);

// The definition above written as plain loops (std::fma), for tests: sgemm equals it bit for bit.
void sgemm_reference(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a,
                     int lda, const float* b, int ldb, float beta, float* c, int ldc);

// Which kernel sgemm runs on this CPU: "avx512", "avx2" or "portable".
const char* sgemm_kernel_name();

// Forces a kernel (tests hold every kernel this CPU can run to the reference). Returns false,
// changing nothing, when the CPU cannot run it. Not thread-safe: call before any sgemm.
bool sgemm_force_kernel(const char* name);

}  // namespace loopmoe::model::ops::cpu
