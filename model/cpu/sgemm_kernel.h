// The register-blocked micro-kernel of model/cpu/sgemm.cc, written once over a vector type and
// compiled by one file per instruction set (sgemm_avx512.cc, sgemm_avx2.cc, sgemm_portable.cc).
// Private to model/cpu/. Each file instantiates it with a vector type from its own anonymous
// namespace, so every instantiation has internal linkage: code compiled for one instruction set is
// never merged into another file's (an AVX-512 copy of a shared inline function would crash a CPU
// without AVX-512).
//
// Vec provides: V, kWidth (floats per vector), zero(), load(p, n) / store(p, v, n) of the first
// n <= kWidth floats (the rest read as zero, not written), bcast(p), fma(a, b, c) = a·b + c
// rounded once, mul(a, b), add(a, b).
#pragma once

#include <cstddef>

#include "model/cpu/sgemm_micro.h"

namespace loopmoe::model::ops::cpu {

template <class Vec, int R, int NV, bool kRowMajorA>
void micro_kernel(const MicroArgs& x, const float* ap, int a_stride, const float* bp, float* c,
                  float* part, int cols) {
  using V = typename Vec::V;
  constexpr int W = Vec::kWidth;
  V acc[R][NV];
  if (x.resume) {  // the chain so far, parked raw by the previous K block
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < NV; ++v) acc[r][v] = Vec::load(part + r * x.ldp + v * W, W);
    }
  } else {
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < NV; ++v) acc[r][v] = Vec::zero();
    }
  }
  for (int k = 0; k < x.kc; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Vec::load(bp + v * W, W);
    for (int r = 0; r < R; ++r) {
      const V av = Vec::bcast(kRowMajorA ? ap + static_cast<size_t>(r) * a_stride : ap + r);
      for (int v = 0; v < NV; ++v) acc[r][v] = Vec::fma(av, b[v], acc[r][v]);
    }
    ap += kRowMajorA ? 1 : a_stride;
    bp += x.panel;
  }
  if (!x.final) {  // park the raw chain for the next K block (float stores are exact)
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < NV; ++v) Vec::store(part + r * x.ldp + v * W, acc[r][v], W);
    }
    return;
  }
  // C = alpha·acc (+ beta·C): two products and an add, never fused (the contract).
  const V va = Vec::bcast(&x.alpha), vb = Vec::bcast(&x.beta);
  for (int r = 0; r < R; ++r) {
    float* row = c + static_cast<size_t>(r) * x.ldc;
    for (int v = 0; v < NV; ++v) {
      const int n = cols - v * W < W ? cols - v * W : W;
      V out = Vec::mul(va, acc[r][v]);
      if (x.beta != 0.f) out = Vec::add(out, Vec::mul(vb, Vec::load(row + v * W, n)));
      Vec::store(row + v * W, out, n);
    }
  }
}

// Every instantiation for 1..MR rows and 1..NV vectors of columns, both A layouts.
template <class Vec, int MR, int NV>
struct MicroTableBuilder {
  template <int R, int N>
  static void fill(MicroTable& t) {
    t.kernel[R - 1][N - 1][1] = micro_kernel<Vec, R, N, true>;
    t.kernel[R - 1][N - 1][0] = micro_kernel<Vec, R, N, false>;
    if constexpr (N < NV) {
      fill<R, N + 1>(t);
    } else if constexpr (R < MR) {
      fill<R + 1, 1>(t);
    }
  }
  static MicroTable build() {
    MicroTable t{};
    t.mr = MR;
    t.nv = NV;
    t.width = Vec::kWidth;
    fill<1, 1>(t);
    return t;
  }
};

}  // namespace loopmoe::model::ops::cpu
