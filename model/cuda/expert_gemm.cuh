// The grouped expert products in bf16 on the tensor cores, one launch for all experts, with the
// experts' row offsets read on the device. ops_moe.cu runs the bf16 experts with them (cuBLAS has
// no grouped product of bf16 operands into an fp32 C: gemm_grouped's comment); since the sizes
// never reach the host, they are also what a router that keeps its dispatch layout on the device
// needs (no host round trip per layer). In a header of its own, like flash_attention.cuh, so that
// it compiles for the GPU with nvcc and for the host under tests/cuda_emulation/, which runs it
// against a CPU reference where no GPU is present: no CUDA API call here (launches stay in
// ops_moe.cu), the dynamic shared memory behind a macro.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <mma.h>
#endif

// 128-byte aligned: the wmma tiles need 32-byte aligned addresses.
#ifndef LOOPMOE_DYNAMIC_SHARED
#define LOOPMOE_DYNAMIC_SHARED(name) extern __shared__ __align__(128) float name[]
#endif

namespace loopmoe::model::ops::cuda::expert_gemm {

// Expert e owns rows [offset[e], offset[e + 1]) of the expert-ordered activations (offset on the
// device, E + 1 non-decreasing values). Row-major fp32 operands everywhere; every operand element
// is rounded to bf16 (round to nearest even, model/bf16.h's bits) as it is loaded, the products
// accumulate in fp32 (ops.h MatmulPrecision::kBf16: the maths of gemm's bf16 path, in another
// accumulation order). Two kinds:
//
//   kRows     C[r][j] = alpha Σ_k A[r][k] B_e(k, j) + beta C[r][j] for every row r of every expert
//             e, j < N, k < K; B_e(k, j) = b[e·stride_b + k·ldb + j], or with trans_b
//             b[e·stride_b + j·ldb + k]. (h = x W1, out = act W2, dact = dout W2ᵀ, dx = dh W1ᵀ.)
//   kWeights  C_e[i][j] = alpha Σ_{r of e} A[r][i] B[r][j] + beta C_e[i][j] for i < M, j < N,
//             C_e = c + e·stride_c. (dW = xᵀ dh, summed over the expert's rows.)
//
// beta == 0 writes C without reading it (cuBLAS's rule: C may hold NaN). An expert without rows
// gets nothing: kWeights leaves its C_e as it is, which is the per-expert loop's "+= nothing"
// (ops_moe.cu calls these with beta 1 there). Deterministic and batch invariant: each element of C
// is written by one thread, its sum runs over k in a fixed order (tiles of kTileK, the tensor
// cores' 16-deep steps within), and a row's result depends on its own row of A only; no atomics.
//
// Tiles: 64 × 64 of C per block of 4 warps (2 × 2, each 32 × 32 as 2 × 2 wmma 16×16×16
// accumulators), K in steps of kTileK = 32 through shared memory as bf16; the accumulators go
// through shared memory in fp32 for the bounds-checked epilogue. A first version: no cp.async,
// no double buffering, scalar loads.
enum class Kind : int { kRows = 0, kWeights = 1 };

struct Problem {
  Kind kind = Kind::kRows;
  bool trans_b = false;  // kRows only
  int E = 0;
  int M = 0;  // kWeights: rows of each C_e
  int N = 0;
  int K = 0;                        // kRows: the inner dimension
  const int64_t* offset = nullptr;  // device, E + 1
  const float* a = nullptr;
  int lda = 0;
  const float* b = nullptr;
  int ldb = 0;
  long long stride_b = 0;  // kRows: elements from one expert's B to the next
  float* c = nullptr;
  int ldc = 0;
  long long stride_c = 0;  // kWeights: elements from one expert's C to the next
  float alpha = 1.f;
  float beta = 0.f;
};

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 32;
constexpr int kThreads = 128;
constexpr int kALd = kTileK + 8;  // bf16 [kTileM][kALd]: A(m, k)
constexpr int kBLd = kTileN + 8;  // bf16 [kTileK][kBLd]: B(k, n)
constexpr int kCLd = kTileN + 4;  // fp32 [kTileM][kCLd]: the accumulators
// In floats; each region a multiple of 32 bytes, so each starts 32-byte aligned.
constexpr size_t smem_floats() {
  return static_cast<size_t>(kTileM) * kALd / 2 + static_cast<size_t>(kTileK) * kBLd / 2 +
         static_cast<size_t>(kTileM) * kCLd;
}
static_assert(kTileM * kALd % 32 == 0 && kTileK * kBLd % 32 == 0, "32-byte aligned regions");

// The grid: kRows, x over the experts' row tiles (rows_bound / kTileM + E covers every expert's
// last partial tile, whatever the split of at most rows_bound rows), y over C's column tiles;
// kWeights, x over column tiles, y over (expert, row tile of C_e).
struct Grid {
  unsigned x, y;
};
inline Grid grid_for(const Problem& p, int64_t rows_bound) {
  const unsigned n_tiles = static_cast<unsigned>((p.N + kTileN - 1) / kTileN);
  if (p.kind == Kind::kRows) {
    return {static_cast<unsigned>((rows_bound + kTileM - 1) / kTileM + p.E), n_tiles};
  }
  return {n_tiles, static_cast<unsigned>((p.M + kTileM - 1) / kTileM * p.E)};
}

namespace wmma = nvcuda::wmma;

__device__ inline __nv_bfloat16 operand(const float* p, bool inside) {
  return __float2bfloat16(inside ? *p : 0.f);
}

__global__ void __launch_bounds__(kThreads) expert_gemm_kernel(Problem p) {
  LOOPMOE_DYNAMIC_SHARED(smem);
  __nv_bfloat16* as = reinterpret_cast<__nv_bfloat16*>(smem);  // [kTileM][kALd]
  __nv_bfloat16* bs = as + kTileM * kALd;                      // [kTileK][kBLd]
  float* cs = reinterpret_cast<float*>(bs + kTileK * kBLd);    // [kTileM][kCLd]

  // This block's expert, its rows [r_begin, r_end), and its tile of C: rows m0.., columns n0...
  int e = 0;
  int64_t r_begin = 0, r_end = 0;
  int m0 = 0, n0 = 0;
  if (p.kind == Kind::kRows) {
    int64_t tile = blockIdx.x;
    for (; e < p.E; ++e) {
      const int64_t tiles = (p.offset[e + 1] - p.offset[e] + kTileM - 1) / kTileM;
      if (tile < tiles) break;
      tile -= tiles;
    }
    if (e == p.E) return;  // past the last expert's last tile (the whole block: uniform)
    r_begin = p.offset[e] + tile * kTileM;
    r_end = p.offset[e + 1];
    n0 = blockIdx.y * kTileN;
  } else {
    const int m_tiles = (p.M + kTileM - 1) / kTileM;
    e = blockIdx.y / m_tiles;
    m0 = (blockIdx.y % m_tiles) * kTileM;
    n0 = blockIdx.x * kTileN;
    r_begin = p.offset[e];
    r_end = p.offset[e + 1];
    if (r_end == r_begin) return;  // no rows: C_e stays as it is
  }
  const int64_t depth = p.kind == Kind::kRows ? p.K : r_end - r_begin;
  const float* b = p.kind == Kind::kRows ? p.b + e * p.stride_b : p.b;

  const int warp = threadIdx.x / 32, wy = warp / 2, wx = warp % 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }
  for (int64_t k0 = 0; k0 < depth; k0 += kTileK) {
    __syncthreads();  // every warp is done with the previous tiles
    // A(m, k): consecutive threads along memory's contiguous dimension.
    for (int i = threadIdx.x; i < kTileM * kTileK; i += blockDim.x) {
      if (p.kind == Kind::kRows) {
        const int m = i / kTileK, k = i % kTileK;
        const int64_t r = r_begin + m;
        const bool inside = r < r_end && k0 + k < depth;
        as[m * kALd + k] = operand(p.a + (inside ? r * p.lda + k0 + k : 0), inside);
      } else {
        const int k = i / kTileM, m = i % kTileM;
        const int64_t r = r_begin + k0 + k;
        const bool inside = r < r_end && m0 + m < p.M;
        as[m * kALd + k] = operand(p.a + (inside ? r * p.lda + m0 + m : 0), inside);
      }
    }
    // B(k, n).
    for (int i = threadIdx.x; i < kTileK * kTileN; i += blockDim.x) {
      if (p.kind == Kind::kRows && p.trans_b) {
        const int n = i / kTileK, k = i % kTileK;
        const bool inside = k0 + k < depth && n0 + n < p.N;
        bs[k * kBLd + n] =
            operand(b + (inside ? static_cast<int64_t>(n0 + n) * p.ldb + k0 + k : 0), inside);
      } else {
        const int k = i / kTileN, n = i % kTileN;
        const int64_t r = p.kind == Kind::kRows ? k0 + k : r_begin + k0 + k;
        const bool inside = (p.kind == Kind::kRows ? k0 + k < depth : r < r_end) && n0 + n < p.N;
        bs[k * kBLd + n] = operand(b + (inside ? r * p.ldb + n0 + n : 0), inside);
      }
    }
    __syncthreads();
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb[2];
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(fa[i], as + (32 * wy + 16 * i) * kALd + kk, kALd);
      }
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(fb[j], bs + kk * kBLd + 32 * wx + 16 * j, kBLd);
      }
      for (int i = 0; i < 2; ++i) {
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(cs + (32 * wy + 16 * i) * kCLd + 32 * wx + 16 * j, acc[i][j], kCLd,
                              wmma::mem_row_major);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTileM * kTileN; i += blockDim.x) {
    const int m = i / kTileN, n = i % kTileN;
    if (n0 + n >= p.N) continue;
    float* out;
    if (p.kind == Kind::kRows) {
      const int64_t r = r_begin + m;
      if (r >= r_end) continue;
      out = p.c + r * p.ldc + n0 + n;
    } else {
      if (m0 + m >= p.M) continue;
      out = p.c + e * p.stride_c + static_cast<int64_t>(m0 + m) * p.ldc + n0 + n;
    }
    const float value = p.alpha * cs[m * kCLd + n];
    *out = p.beta == 0.f ? value : value + p.beta * *out;
  }
}

}  // namespace loopmoe::model::ops::cuda::expert_gemm
