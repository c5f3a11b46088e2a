// sgemm micro-kernels for AVX-512 (this file is compiled with -mavx512f -mfma): tiles of up to
// 12 rows × 32 columns, 24 accumulator registers.
#include <immintrin.h>

#include "model/cpu/sgemm_kernel.h"

namespace loopmoe::model::ops::cpu {
namespace {

struct Avx512 {
  using V = __m512;
  static constexpr int kWidth = 16;
  static __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p, int n) {
    return n == kWidth ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask(n), p);
  }
  static void store(float* p, V v, int n) {
    if (n == kWidth) {
      _mm512_storeu_ps(p, v);
    } else {
      _mm512_mask_storeu_ps(p, mask(n), v);
    }
  }
  static V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
};

}  // namespace

const MicroTable& avx512_micro_table() {
  static const MicroTable table = MicroTableBuilder<Avx512, 12, 2>::build();
  return table;
}

}  // namespace loopmoe::model::ops::cpu
