// The fused (flash) causal attention kernels of model/cuda/ops_attention.cu, in a header of their
// own so that they compile twice: with nvcc for the GPU, and with the host compiler under the
// CPU emulation of tests/cuda_emulation/ (each CUDA thread a host thread, __syncthreads a
// barrier, __shfl_xor_sync an exchange), which runs them against the CPU attention where no GPU
// is present. Hence plain expf/logf/fmaf and the dynamic shared memory behind a macro; nothing
// here may use a CUDA API call (launches and attributes stay in ops_attention.cu).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "model/bf16.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <mma.h>
#endif

// 128-byte aligned: the tensor-core kernels' tiles need 32-byte aligned addresses.
#ifndef LOOPMOE_FLASH_DYNAMIC_SHARED
#define LOOPMOE_FLASH_DYNAMIC_SHARED(name) extern __shared__ __align__(128) float name[]
#endif

namespace loopmoe::model::ops::cuda::flash {

// Forward: one block per (query tile of kTile rows, sequence·head); it walks the key tiles up to
// the diagonal with an online softmax (running max m and sum l per row, the output rescaled when
// the max grows), so nothing T×T is written; lse = m + log l is saved. Backward, without atomics
// so that it is deterministic: a row kernel computes D_t = dO_t·O_t (= rowsum(dP ⊙ P)); the KV
// kernel gives one block to each key tile, which walks the query tiles from the diagonal on and
// owns dK, dV of its keys; the Q kernel gives one block to each query tile, which walks the key
// tiles up to the diagonal and owns dQ. Both recompute P = exp(q·k/√hd − lse). Every sum runs in
// a fixed order (the d loop, the tile loop, the butterfly over the 16 lanes of a row), so the
// bits are the same run to run, and a sequence's results do not depend on the other sequences of
// the call (batch invariance).
//
// Threads: 256 as 16 × 16; thread (ty, tx) owns the tile's rows 4·ty .. 4·ty + 3 and its columns
// tx + 16·j (scores: j < 4; head columns: j < HDP / 16). A row's 16 owners are one half of a
// warp, so the row max and sum are shuffles within it. Head columns are padded to HDP (16, 32, 64
// or 128) with zeros in shared memory; Q/K-like tiles have row stride HDP + 1 (odd: the 16 rows
// read at the same column fall in distinct banks).
//
// bf16 (train.precision = "bf16"): every operand of a product rounded to bf16 as ops::gemm does
// (Q, K, V, dO when loaded; P and dS before their products), fp32 accumulation. The CPU rounds
// the normalised probabilities before P·V, this forward the unnormalised exp(s − m) (divided by l
// at the end), so the two differ at bf16's resolution there, not only by accumulation order.
constexpr int kTile = 64;
constexpr int kFlashThreads = 256;
constexpr int kMaxFusedHeadDim = 128;

__device__ inline float maybe_bf16(float x, bool bf16) {
  return bf16 ? __uint_as_float(bf16_round_bits(__float_as_uint(x))) : x;
}

// Within the half warp that owns a row (xor offsets 8, 4, 2, 1 stay inside it): every lane gets
// the same bits (a + b == b + a, the same tree in every lane).
__device__ inline float half_warp_max(float x) {
  for (int offset = 8; offset > 0; offset /= 2) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}
__device__ inline float half_warp_sum(float x) {
  for (int offset = 8; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// dst[r][d] (row stride `stride`) = src[(row0 + r) · ld + d] for the kTile rows r and HDP columns
// d; zero past the sequence's end (row0 + r >= T_) and past the head (d >= hd); bf16-rounded
// when asked.
template <int HDP>
__device__ void load_tile(float* dst, int stride, const float* src, int ld, int row0, int T_,
                          int hd, bool bf16) {
  for (int i = threadIdx.x; i < kTile * HDP; i += blockDim.x) {
    const int r = i / HDP, d = i % HDP, t = row0 + r;
    dst[r * stride + d] =
        t < T_ && d < hd ? maybe_bf16(src[static_cast<size_t>(t) * ld + d], bf16) : 0.f;
  }
}

// s[i][j] = Σ_d A[4·ty + i][d] · B[tx + 16·j][d] (both with row stride HDP + 1), d in order.
template <int HDP>
__device__ inline void tile_scores(float (&s)[4][4], const float* a, const float* b) {
  constexpr int kS = HDP + 1;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) s[i][j] = 0.f;
  }
#pragma unroll 4
  for (int d = 0; d < HDP; ++d) {
    float av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) av[i] = a[(ty * 4 + i) * kS + d];
#pragma unroll
    for (int j = 0; j < 4; ++j) bv[j] = b[(tx + 16 * j) * kS + d];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) s[i][j] = fmaf(av[i], bv[j], s[i][j]);
    }
  }
}

// acc[i][j] += Σ_r W[4·ty + i][r] · X[r][tx + 16·j] over the kTile rows r in order (W with row
// stride kTile + 1, X with row stride x_stride).
template <int HDP>
__device__ inline void tile_accumulate(float (&acc)[4][HDP / 16], const float* w, const float* x,
                                       int x_stride) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll 4
  for (int r = 0; r < kTile; ++r) {
    float xv[HDP / 16];
#pragma unroll
    for (int j = 0; j < HDP / 16; ++j) xv[j] = x[r * x_stride + tx + 16 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float wv = w[(ty * 4 + i) * (kTile + 1) + r];
#pragma unroll
      for (int j = 0; j < HDP / 16; ++j) acc[i][j] = fmaf(wv, xv[j], acc[i][j]);
    }
  }
}

template <int HDP>
__global__ void __launch_bounds__(kFlashThreads)
    flash_forward_kernel(float* out, float* lse, const float* qkv, int T_, int H, int hd,
                         float scale, bool bf16) {
  LOOPMOE_FLASH_DYNAMIC_SHARED(smem);
  constexpr int kS = HDP + 1, kJ = HDP / 16;
  float* qs = smem;              // [kTile][kS]
  float* ks = qs + kTile * kS;   // [kTile][kS]
  float* vs = ks + kTile * kS;   // [kTile][HDP]
  float* ps = vs + kTile * HDP;  // [kTile][kTile + 1]
  // The longest query tiles (most key tiles) first, so the short ones fill the tail.
  const int q0 = (gridDim.x - 1 - blockIdx.x) * kTile;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int inner = H * hd, ld = 3 * inner;
  const float* q = qkv + static_cast<size_t>(b) * T_ * ld + h * hd;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  load_tile<HDP>(qs, kS, q, ld, q0, T_, hd, bf16);
  float m[4], l[4], o[4][kJ];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int j = 0; j < kJ; ++j) o[i][j] = 0.f;
  }
  for (int k0 = 0; k0 <= q0; k0 += kTile) {
    __syncthreads();  // qs is loaded; the previous tile's reads of ks, vs, ps are done
    load_tile<HDP>(ks, kS, q + inner, ld, k0, T_, hd, bf16);
    load_tile<HDP>(vs, HDP, q + 2 * inner, ld, k0, T_, hd, bf16);
    __syncthreads();
    float s[4][4];
    tile_scores<HDP>(s, qs, ks);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int t = q0 + ty * 4 + i;
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int key = k0 + tx + 16 * j;
        s[i][j] = key <= t && t < T_ ? s[i][j] * scale : -INFINITY;
        mx = fmaxf(mx, s[i][j]);
      }
      const float m_new = fmaxf(m[i], half_warp_max(mx));
      // A row with no key yet (only rows past the sequence's end) keeps m = -inf and p = 0.
      const float base = m_new == -INFINITY ? 0.f : m_new;
      const float correction = expf(m[i] - base);  // 0 while m[i] = -inf
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float p = expf(s[i][j] - base);
        sum += p;
        ps[(ty * 4 + i) * (kTile + 1) + tx + 16 * j] = maybe_bf16(p, bf16);
      }
      l[i] = l[i] * correction + half_warp_sum(sum);
      m[i] = m_new;
#pragma unroll
      for (int j = 0; j < kJ; ++j) o[i][j] *= correction;
    }
    __syncthreads();
    tile_accumulate<HDP>(o, ps, vs, HDP);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int t = q0 + ty * 4 + i;
    if (t >= T_) continue;
    const float inv = 1.f / l[i];
    float* row = out + (static_cast<size_t>(b) * T_ + t) * inner + h * hd;
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      const int d = tx + 16 * j;
      if (d < hd) row[d] = o[i][j] * inv;
    }
    if (tx == 0) lse[static_cast<size_t>(bh) * T_ + t] = m[i] + logf(l[i]);
  }
}

// dsum[bh, t] = Σ_d dO[t, h, d] · O[t, h, d] in d order (dO bf16-rounded in bf16, as the products
// that use it see it). One thread per (sequence·head, query).
__global__ void flash_backward_dot_kernel(float* dsum, const float* dout, const float* out, int B,
                                          int T_, int H, int hd, bool bf16) {
  const size_t n = static_cast<size_t>(B) * H * T_;
  for (size_t idx = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int t = static_cast<int>(idx % T_);
    const int bh = static_cast<int>(idx / T_), b = bh / H, h = bh % H;
    const size_t at = (static_cast<size_t>(b) * T_ + t) * H * hd + static_cast<size_t>(h) * hd;
    float acc = 0.f;
    for (int d = 0; d < hd; ++d) acc = fmaf(maybe_bf16(dout[at + d], bf16), out[at + d], acc);
    dsum[idx] = acc;
  }
}

// dK, dV of one key tile. Rows here are keys (4·ty + i), columns queries (tx + 16·j): the tiles
// of Sᵀ and dPᵀ, then dV += Pᵀ dO and dK += dSᵀ Q over the query tile's rows.
template <int HDP>
__global__ void __launch_bounds__(kFlashThreads)
    flash_backward_kv_kernel(float* dqkv, const float* dout, const float* qkv, const float* lse,
                             const float* dsum, int T_, int H, int hd, float scale, bool bf16) {
  LOOPMOE_FLASH_DYNAMIC_SHARED(smem);
  constexpr int kS = HDP + 1, kJ = HDP / 16;
  float* ks = smem;                          // [kTile][kS]
  float* vs = ks + kTile * kS;               // [kTile][kS]
  float* qs = vs + kTile * kS;               // [kTile][kS]
  float* gs = qs + kTile * kS;               // dO [kTile][kS]
  float* pt = gs + kTile * kS;               // Pᵀ [kTile][kTile + 1]
  float* dst = pt + kTile * (kTile + 1);     // dSᵀ [kTile][kTile + 1]
  float* lse_s = dst + kTile * (kTile + 1);  // [kTile]
  float* dsum_s = lse_s + kTile;             // [kTile]
  // Key tiles near the start see the most query tiles: they go first.
  const int k0 = blockIdx.x * kTile;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int inner = H * hd, ld = 3 * inner;
  const float* q = qkv + static_cast<size_t>(b) * T_ * ld + h * hd;
  const float* g = dout + static_cast<size_t>(b) * T_ * inner + h * hd;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  load_tile<HDP>(ks, kS, q + inner, ld, k0, T_, hd, bf16);
  load_tile<HDP>(vs, kS, q + 2 * inner, ld, k0, T_, hd, bf16);
  float dk[4][kJ], dv[4][kJ];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < kJ; ++j) dk[i][j] = dv[i][j] = 0.f;
  }
  for (int q0 = k0; q0 < T_; q0 += kTile) {
    __syncthreads();  // the previous tile's reads of qs, gs, pt, dst are done
    load_tile<HDP>(qs, kS, q, ld, q0, T_, hd, bf16);
    load_tile<HDP>(gs, kS, g, inner, q0, T_, hd, bf16);
    if (threadIdx.x < kTile) {
      const int t = q0 + threadIdx.x;
      lse_s[threadIdx.x] = t < T_ ? lse[static_cast<size_t>(bh) * T_ + t] : 0.f;
      dsum_s[threadIdx.x] = t < T_ ? dsum[static_cast<size_t>(bh) * T_ + t] : 0.f;
    }
    __syncthreads();  // also orders the loads of ks and vs before their first use
    float st[4][4], dpt[4][4];
    tile_scores<HDP>(st, ks, qs);   // k·q
    tile_scores<HDP>(dpt, vs, gs);  // v·dO
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int key = k0 + ty * 4 + i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = tx + 16 * j, t = q0 + c;
        float p = 0.f, ds = 0.f;
        if (key <= t && t < T_) {
          p = expf(st[i][j] * scale - lse_s[c]);
          ds = p * (dpt[i][j] - dsum_s[c]);
        }
        pt[(ty * 4 + i) * (kTile + 1) + c] = maybe_bf16(p, bf16);
        dst[(ty * 4 + i) * (kTile + 1) + c] = maybe_bf16(ds, bf16);
      }
    }
    __syncthreads();
    tile_accumulate<HDP>(dv, pt, gs, kS);
    tile_accumulate<HDP>(dk, dst, qs, kS);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int key = k0 + ty * 4 + i;
    if (key >= T_) continue;
    float* row = dqkv + (static_cast<size_t>(b) * T_ + key) * ld + h * hd;
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      const int d = tx + 16 * j;
      if (d < hd) {
        row[inner + d] = dk[i][j] * scale;
        row[2 * inner + d] = dv[i][j];
      }
    }
  }
}

// dQ of one query tile: rows queries, columns keys; dQ += dS K over the key tile's rows.
template <int HDP>
__global__ void __launch_bounds__(kFlashThreads)
    flash_backward_q_kernel(float* dqkv, const float* dout, const float* qkv, const float* lse,
                            const float* dsum, int T_, int H, int hd, float scale, bool bf16) {
  LOOPMOE_FLASH_DYNAMIC_SHARED(smem);
  constexpr int kS = HDP + 1, kJ = HDP / 16;
  float* qs = smem;                                     // [kTile][kS]
  float* gs = qs + kTile * kS;                          // dO [kTile][kS]
  float* ks = gs + kTile * kS;                          // [kTile][kS]
  float* vs = ks + kTile * kS;                          // [kTile][kS]
  float* dss = vs + kTile * kS;                         // dS [kTile][kTile + 1]
  const int q0 = (gridDim.x - 1 - blockIdx.x) * kTile;  // the longest first
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int inner = H * hd, ld = 3 * inner;
  const float* q = qkv + static_cast<size_t>(b) * T_ * ld + h * hd;
  const float* g = dout + static_cast<size_t>(b) * T_ * inner + h * hd;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  load_tile<HDP>(qs, kS, q, ld, q0, T_, hd, bf16);
  load_tile<HDP>(gs, kS, g, inner, q0, T_, hd, bf16);
  float row_lse[4], row_dsum[4], dq[4][kJ];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int t = q0 + ty * 4 + i;
    row_lse[i] = t < T_ ? lse[static_cast<size_t>(bh) * T_ + t] : 0.f;
    row_dsum[i] = t < T_ ? dsum[static_cast<size_t>(bh) * T_ + t] : 0.f;
#pragma unroll
    for (int j = 0; j < kJ; ++j) dq[i][j] = 0.f;
  }
  for (int k0 = 0; k0 <= q0; k0 += kTile) {
    __syncthreads();  // qs, gs are loaded; the previous tile's reads of ks, vs, dss are done
    load_tile<HDP>(ks, kS, q + inner, ld, k0, T_, hd, bf16);
    load_tile<HDP>(vs, kS, q + 2 * inner, ld, k0, T_, hd, bf16);
    __syncthreads();
    float s[4][4], dp[4][4];
    tile_scores<HDP>(s, qs, ks);
    tile_scores<HDP>(dp, gs, vs);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int t = q0 + ty * 4 + i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int key = k0 + tx + 16 * j;
        float ds = 0.f;
        if (key <= t && t < T_) {
          ds = expf(s[i][j] * scale - row_lse[i]) * (dp[i][j] - row_dsum[i]);
        }
        dss[(ty * 4 + i) * (kTile + 1) + tx + 16 * j] = maybe_bf16(ds, bf16);
      }
    }
    __syncthreads();
    tile_accumulate<HDP>(dq, dss, ks, kS);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int t = q0 + ty * 4 + i;
    if (t >= T_) continue;
    float* row = dqkv + (static_cast<size_t>(b) * T_ + t) * ld + h * hd;
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      const int d = tx + 16 * j;
      if (d < hd) row[d] = dq[i][j] * scale;
    }
  }
}

// Dynamic shared memory of each kernel, in floats.
constexpr size_t forward_smem_floats(int hdp) {
  return static_cast<size_t>(kTile) * (2 * (hdp + 1) + hdp) + kTile * (kTile + 1);
}
constexpr size_t backward_kv_smem_floats(int hdp) {
  return static_cast<size_t>(kTile) * 4 * (hdp + 1) + 2 * kTile * (kTile + 1) + 2 * kTile;
}
constexpr size_t backward_q_smem_floats(int hdp) {
  return static_cast<size_t>(kTile) * 4 * (hdp + 1) + kTile * (kTile + 1);
}
// The largest (the KV kernel's at head size 128) is 166 KB: within the 227 KB a block may opt in
// to on sm_90.
static_assert(backward_kv_smem_floats(kMaxFusedHeadDim) * sizeof(float) <= 227 * 1024);

// ---- bf16 on the tensor cores: the same three kernels with nvcuda::wmma products ----
// train.precision = "bf16" only (fp32 keeps the SIMT kernels above, which the fp32 parity with the
// CPU needs). The maths and roundings are the SIMT kernels' bf16 ones: q, k, v, dO rounded to
// bf16 when a tile is loaded, P and dS rounded before their products, fp32 accumulation; only the
// order of the accumulation differs (the tensor cores' 16×16×16 tiles). The products run on
// 16×16×16 wmma tiles, a warp per 16 rows of a 64-row tile (4 warps); scores go through shared
// memory in fp32, where the softmax, masking and dS are SIMT work: lane l of warp w owns row
// 16·w + l/2 of the tile and half l%2 of its columns (32 of the 64 scores, HDP/2 of the output),
// so a row's max and sum are one shuffle. The forward's output is kept in registers in that
// layout, since its rescaling by the running max is per row, which a wmma accumulator (whose
// element layout is unspecified) cannot do; each key tile's P·V goes through shared memory into
// it. The backward's dK, dV and dQ need no rescaling and stay in wmma accumulators.
namespace wmma = nvcuda::wmma;
constexpr int kWarps = kTile / 16;
constexpr int kWmmaThreads = 32 * kWarps;
constexpr int kScoreLd = kTile + 4;  // fp32 score tiles [kTile][kScoreLd]
constexpr int kProbLd = kTile + 8;   // bf16 probability tiles [kTile][kProbLd]
using AFragment = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using BRowFragment = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using BColFragment = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major>;
using Accumulator = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// As load_tile, into bf16 (row stride ld), always rounded.
template <int HDP>
__device__ void load_tile_bf16(__nv_bfloat16* dst, int ld, const float* src, int src_ld, int row0,
                               int T_, int hd) {
  for (int i = threadIdx.x; i < kTile * HDP; i += blockDim.x) {
    const int r = i / HDP, d = i % HDP, t = row0 + r;
    dst[r * ld + d] =
        __float2bfloat16(t < T_ && d < hd ? src[static_cast<size_t>(t) * src_ld + d] : 0.f);
  }
}

// One warp: c[16][kTile] (fp32, row stride kScoreLd) = A[16][HDP] · Bᵀ, where B is [kTile][HDP]
// (row strides lda, ldb).
template <int HDP>
__device__ void warp_scores(float* c, const __nv_bfloat16* a, int lda, const __nv_bfloat16* b,
                            int ldb) {
  for (int n = 0; n < kTile / 16; ++n) {
    Accumulator acc;
    wmma::fill_fragment(acc, 0.f);
    for (int kk = 0; kk < HDP; kk += 16) {
      AFragment fa;
      BColFragment fb;
      wmma::load_matrix_sync(fa, a + kk, lda);
      wmma::load_matrix_sync(fb, b + 16 * n * ldb + kk,
                             ldb);  // element (k, j) = B[16n + j][kk + k]
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c + 16 * n, acc, kScoreLd, wmma::mem_row_major);
  }
}

// One warp: acc[j] += A[16][kTile] · X[kTile][16 j .. 16 j + 16) for j < HDP/16 (row strides
// lda, ldx).
template <int HDP>
__device__ void warp_accumulate(Accumulator (&acc)[HDP / 16], const __nv_bfloat16* a, int lda,
                                const __nv_bfloat16* x, int ldx) {
  for (int kk = 0; kk < kTile; kk += 16) {
    AFragment fa;
    wmma::load_matrix_sync(fa, a + kk, lda);
    for (int j = 0; j < HDP / 16; ++j) {
      BRowFragment fb;
      wmma::load_matrix_sync(fb, x + kk * ldx + 16 * j, ldx);
      wmma::mma_sync(acc[j], fa, fb, acc[j]);
    }
  }
}

// Shared memory of the wmma kernels, in floats (every region a multiple of 32 bytes, so each
// starts 32-byte aligned).
constexpr size_t bf16_tile_floats(int hdp) { return static_cast<size_t>(kTile) * (hdp + 8) / 2; }
constexpr size_t prob_tile_floats() { return static_cast<size_t>(kTile) * kProbLd / 2; }
constexpr size_t score_tile_floats() { return static_cast<size_t>(kTile) * kScoreLd; }
constexpr size_t forward_wmma_smem_floats(int hdp) {
  return 3 * bf16_tile_floats(hdp) + prob_tile_floats() + score_tile_floats() +
         static_cast<size_t>(kTile) * (hdp + 4);
}
constexpr size_t backward_kv_wmma_smem_floats(int hdp) {
  return 4 * bf16_tile_floats(hdp) + 2 * prob_tile_floats() + 2 * score_tile_floats() + 2 * kTile;
}
constexpr size_t backward_q_wmma_smem_floats(int hdp) {
  return 4 * bf16_tile_floats(hdp) + prob_tile_floats() + 2 * score_tile_floats();
}
// The backward stages its [kTile][HDP + 4] fp32 results in the two score tiles.
static_assert(kTile * (kMaxFusedHeadDim + 4) <= 2 * kTile * kScoreLd);

// Writes rows [row0, row0 + kTile) ∩ [0, T_) and columns [0, hd) of a warp-staged fp32 tile
// (stage[kTile][HDP + 4]) to dst (row stride ld): lane l of warp w its row 16 w + l/2, half l%2.
template <int HDP>
__device__ void write_staged_rows(float* dst, int ld, const float* stage, int row0, int T_,
                                  int hd) {
  const int r = 16 * (threadIdx.x / 32) + (threadIdx.x % 32) / 2, half = threadIdx.x % 2;
  if (row0 + r >= T_) return;
  for (int c = 0; c < HDP / 2; ++c) {
    const int d = HDP / 2 * half + c;
    if (d < hd) dst[static_cast<size_t>(row0 + r) * ld + d] = stage[r * (HDP + 4) + d];
  }
}

template <int HDP>
__global__ void __launch_bounds__(kWmmaThreads)
    flash_forward_wmma_kernel(float* out, float* lse, const float* qkv, int T_, int H, int hd,
                              float scale) {
  LOOPMOE_FLASH_DYNAMIC_SHARED(smem);
  constexpr int kLd = HDP + 8, kOutLd = HDP + 4;
  __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem);  // [kTile][kLd]
  __nv_bfloat16* ks = qs + kTile * kLd;                        // [kTile][kLd]
  __nv_bfloat16* vs = ks + kTile * kLd;                        // [kTile][kLd]
  __nv_bfloat16* ps = vs + kTile * kLd;                        // [kTile][kProbLd]
  float* ss = reinterpret_cast<float*>(ps + kTile * kProbLd);  // [kTile][kScoreLd]
  float* os = ss + kTile * kScoreLd;                           // [kTile][kOutLd]
  const int q0 = (gridDim.x - 1 - blockIdx.x) * kTile;         // the longest first
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int inner = H * hd, ld = 3 * inner;
  const float* q = qkv + static_cast<size_t>(b) * T_ * ld + h * hd;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = 16 * warp + lane / 2, half = lane % 2, t = q0 + r;
  load_tile_bf16<HDP>(qs, kLd, q, ld, q0, T_, hd);
  float m = -INFINITY, l = 0.f, o[HDP / 2];
  for (int c = 0; c < HDP / 2; ++c) o[c] = 0.f;
  for (int k0 = 0; k0 <= q0; k0 += kTile) {
    __syncthreads();  // qs is loaded; every warp is done with the previous ks, vs, os
    load_tile_bf16<HDP>(ks, kLd, q + inner, ld, k0, T_, hd);
    load_tile_bf16<HDP>(vs, kLd, q + 2 * inner, ld, k0, T_, hd);
    __syncthreads();
    warp_scores<HDP>(ss + 16 * warp * kScoreLd, qs + 16 * warp * kLd, kLd, ks, kLd);
    __syncwarp();
    // The online softmax of row r over this tile: each lane its 32 keys, the pair's max and sum
    // by one shuffle (both lanes get the same bits).
    float* srow = ss + r * kScoreLd + 32 * half;
    float mx = -INFINITY;
    for (int c = 0; c < 32; ++c) {
      const int key = k0 + 32 * half + c;
      const float x = key <= t && t < T_ ? srow[c] * scale : -INFINITY;
      srow[c] = x;
      mx = fmaxf(mx, x);
    }
    const float m_new = fmaxf(m, fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1)));
    const float base = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet: p = 0
    const float correction = expf(m - base);              // 0 while m = -inf
    float sum = 0.f;
    __nv_bfloat16* prow = ps + r * kProbLd + 32 * half;
    for (int c = 0; c < 32; ++c) {
      const float p = expf(srow[c] - base);
      sum += p;
      prow[c] = __float2bfloat16(p);
    }
    l = l * correction + (sum + __shfl_xor_sync(0xffffffffu, sum, 1));
    m = m_new;
    __syncwarp();  // the warp's rows of ps are written
    Accumulator acc[HDP / 16];
    for (int j = 0; j < HDP / 16; ++j) wmma::fill_fragment(acc[j], 0.f);
    warp_accumulate<HDP>(acc, ps + 16 * warp * kProbLd, kProbLd, vs, kLd);
    for (int j = 0; j < HDP / 16; ++j) {
      wmma::store_matrix_sync(os + 16 * warp * kOutLd + 16 * j, acc[j], kOutLd,
                              wmma::mem_row_major);
    }
    __syncwarp();
    const float* orow = os + r * kOutLd + HDP / 2 * half;
    for (int c = 0; c < HDP / 2; ++c) o[c] = o[c] * correction + orow[c];
  }
  if (t < T_) {
    const float inv = 1.f / l;
    float* row = out + (static_cast<size_t>(b) * T_ + t) * inner + h * hd;
    for (int c = 0; c < HDP / 2; ++c) {
      const int d = HDP / 2 * half + c;
      if (d < hd) row[d] = o[c] * inv;
    }
    if (half == 0) lse[static_cast<size_t>(bh) * T_ + t] = m + logf(l);
  }
}

// dK, dV of one key tile (rows keys, columns queries), as flash_backward_kv_kernel.
template <int HDP>
__global__ void __launch_bounds__(kWmmaThreads)
    flash_backward_kv_wmma_kernel(float* dqkv, const float* dout, const float* qkv,
                                  const float* lse, const float* dsum, int T_, int H, int hd,
                                  float scale) {
  LOOPMOE_FLASH_DYNAMIC_SHARED(smem);
  constexpr int kLd = HDP + 8;
  __nv_bfloat16* ks = reinterpret_cast<__nv_bfloat16*>(smem);  // [kTile][kLd]
  __nv_bfloat16* vs = ks + kTile * kLd;
  __nv_bfloat16* qs = vs + kTile * kLd;
  __nv_bfloat16* gs = qs + kTile * kLd;                         // dO
  __nv_bfloat16* pt = gs + kTile * kLd;                         // Pᵀ [kTile][kProbLd]
  __nv_bfloat16* dst = pt + kTile * kProbLd;                    // dSᵀ
  float* st = reinterpret_cast<float*>(dst + kTile * kProbLd);  // Sᵀ [kTile][kScoreLd]
  float* dpt = st + kTile * kScoreLd;                           // dPᵀ
  float* lse_s = dpt + kTile * kScoreLd;                        // [kTile]
  float* dsum_s = lse_s + kTile;                                // [kTile]
  const int k0 = blockIdx.x * kTile;  // the longest (most query tiles) first
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int inner = H * hd, ld = 3 * inner;
  const float* q = qkv + static_cast<size_t>(b) * T_ * ld + h * hd;
  const float* g = dout + static_cast<size_t>(b) * T_ * inner + h * hd;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = 16 * warp + lane / 2, half = lane % 2, key = k0 + r;
  load_tile_bf16<HDP>(ks, kLd, q + inner, ld, k0, T_, hd);
  load_tile_bf16<HDP>(vs, kLd, q + 2 * inner, ld, k0, T_, hd);
  Accumulator dk[HDP / 16], dv[HDP / 16];
  for (int j = 0; j < HDP / 16; ++j) {
    wmma::fill_fragment(dk[j], 0.f);
    wmma::fill_fragment(dv[j], 0.f);
  }
  for (int q0 = k0; q0 < T_; q0 += kTile) {
    __syncthreads();  // every warp is done with the previous qs, gs, lse_s, dsum_s
    load_tile_bf16<HDP>(qs, kLd, q, ld, q0, T_, hd);
    load_tile_bf16<HDP>(gs, kLd, g, inner, q0, T_, hd);
    for (int i = threadIdx.x; i < kTile; i += blockDim.x) {
      const int t = q0 + i;
      lse_s[i] = t < T_ ? lse[static_cast<size_t>(bh) * T_ + t] : 0.f;
      dsum_s[i] = t < T_ ? dsum[static_cast<size_t>(bh) * T_ + t] : 0.f;
    }
    __syncthreads();  // also orders the loads of ks and vs before their first use
    warp_scores<HDP>(st + 16 * warp * kScoreLd, ks + 16 * warp * kLd, kLd, qs, kLd);   // K Qᵀ
    warp_scores<HDP>(dpt + 16 * warp * kScoreLd, vs + 16 * warp * kLd, kLd, gs, kLd);  // V dOᵀ
    __syncwarp();
    for (int c = 0; c < 32; ++c) {
      const int col = 32 * half + c, t = q0 + col;
      float p = 0.f, ds = 0.f;
      if (key <= t && t < T_) {
        p = expf(st[r * kScoreLd + col] * scale - lse_s[col]);
        ds = p * (dpt[r * kScoreLd + col] - dsum_s[col]);
      }
      pt[r * kProbLd + col] = __float2bfloat16(p);
      dst[r * kProbLd + col] = __float2bfloat16(ds);
    }
    __syncwarp();
    warp_accumulate<HDP>(dv, pt + 16 * warp * kProbLd, kProbLd, gs, kLd);   // Pᵀ dO
    warp_accumulate<HDP>(dk, dst + 16 * warp * kProbLd, kProbLd, qs, kLd);  // dSᵀ Q
  }
  // The results through shared memory (the score tiles, free now) to the rows < T_, columns < hd.
  float* stage = st;
  __syncthreads();  // no warp still reads st or dpt
  float* base = dqkv + static_cast<size_t>(b) * T_ * ld + h * hd;
  for (int j = 0; j < HDP / 16; ++j) {
    for (int e = 0; e < dk[j].num_elements; ++e) dk[j].x[e] *= scale;
    wmma::store_matrix_sync(stage + 16 * warp * (HDP + 4) + 16 * j, dk[j], HDP + 4,
                            wmma::mem_row_major);
  }
  __syncwarp();
  write_staged_rows<HDP>(base + inner, ld, stage, k0, T_, hd);
  __syncwarp();
  for (int j = 0; j < HDP / 16; ++j) {
    wmma::store_matrix_sync(stage + 16 * warp * (HDP + 4) + 16 * j, dv[j], HDP + 4,
                            wmma::mem_row_major);
  }
  __syncwarp();
  write_staged_rows<HDP>(base + 2 * inner, ld, stage, k0, T_, hd);
}

// dQ of one query tile (rows queries, columns keys), as flash_backward_q_kernel.
template <int HDP>
__global__ void __launch_bounds__(kWmmaThreads)
    flash_backward_q_wmma_kernel(float* dqkv, const float* dout, const float* qkv, const float* lse,
                                 const float* dsum, int T_, int H, int hd, float scale) {
  LOOPMOE_FLASH_DYNAMIC_SHARED(smem);
  constexpr int kLd = HDP + 8;
  __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem);  // [kTile][kLd]
  __nv_bfloat16* gs = qs + kTile * kLd;                        // dO
  __nv_bfloat16* ks = gs + kTile * kLd;
  __nv_bfloat16* vs = ks + kTile * kLd;
  __nv_bfloat16* dss = vs + kTile * kLd;                        // dS [kTile][kProbLd]
  float* ss = reinterpret_cast<float*>(dss + kTile * kProbLd);  // S [kTile][kScoreLd]
  float* dps = ss + kTile * kScoreLd;                           // dP
  const int q0 = (gridDim.x - 1 - blockIdx.x) * kTile;          // the longest first
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int inner = H * hd, ld = 3 * inner;
  const float* q = qkv + static_cast<size_t>(b) * T_ * ld + h * hd;
  const float* g = dout + static_cast<size_t>(b) * T_ * inner + h * hd;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = 16 * warp + lane / 2, half = lane % 2, t = q0 + r;
  load_tile_bf16<HDP>(qs, kLd, q, ld, q0, T_, hd);
  load_tile_bf16<HDP>(gs, kLd, g, inner, q0, T_, hd);
  const float row_lse = t < T_ ? lse[static_cast<size_t>(bh) * T_ + t] : 0.f;
  const float row_dsum = t < T_ ? dsum[static_cast<size_t>(bh) * T_ + t] : 0.f;
  Accumulator dq[HDP / 16];
  for (int j = 0; j < HDP / 16; ++j) wmma::fill_fragment(dq[j], 0.f);
  for (int k0 = 0; k0 <= q0; k0 += kTile) {
    __syncthreads();  // qs, gs are loaded; every warp is done with the previous ks, vs
    load_tile_bf16<HDP>(ks, kLd, q + inner, ld, k0, T_, hd);
    load_tile_bf16<HDP>(vs, kLd, q + 2 * inner, ld, k0, T_, hd);
    __syncthreads();
    warp_scores<HDP>(ss + 16 * warp * kScoreLd, qs + 16 * warp * kLd, kLd, ks, kLd);   // Q Kᵀ
    warp_scores<HDP>(dps + 16 * warp * kScoreLd, gs + 16 * warp * kLd, kLd, vs, kLd);  // dO Vᵀ
    __syncwarp();
    for (int c = 0; c < 32; ++c) {
      const int col = 32 * half + c, key = k0 + col;
      float ds = 0.f;
      if (key <= t && t < T_) {
        ds = expf(ss[r * kScoreLd + col] * scale - row_lse) * (dps[r * kScoreLd + col] - row_dsum);
      }
      dss[r * kProbLd + col] = __float2bfloat16(ds);
    }
    __syncwarp();
    warp_accumulate<HDP>(dq, dss + 16 * warp * kProbLd, kProbLd, ks, kLd);  // dS K
  }
  float* stage = ss;
  __syncthreads();  // no warp still reads ss or dps
  for (int j = 0; j < HDP / 16; ++j) {
    for (int e = 0; e < dq[j].num_elements; ++e) dq[j].x[e] *= scale;
    wmma::store_matrix_sync(stage + 16 * warp * (HDP + 4) + 16 * j, dq[j], HDP + 4,
                            wmma::mem_row_major);
  }
  __syncwarp();
  write_staged_rows<HDP>(dqkv + static_cast<size_t>(b) * T_ * ld + h * hd, ld, stage, q0, T_, hd);
}

}  // namespace loopmoe::model::ops::cuda::flash
