// sgemm micro-kernels for AVX2 + FMA (this file is compiled with -mavx2 -mfma): tiles of up to
// 6 rows × 16 columns, 12 accumulator registers.
#include <immintrin.h>

#include "model/cpu/sgemm_kernel.h"

namespace loopmoe::model::ops::cpu {
namespace {

struct Avx2 {
  using V = __m256;
  static constexpr int kWidth = 8;
  static __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p, int n) {
    return n == kWidth ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask(n));
  }
  static void store(float* p, V v, int n) {
    if (n == kWidth) {
      _mm256_storeu_ps(p, v);
    } else {
      _mm256_maskstore_ps(p, mask(n), v);
    }
  }
  static V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
};

}  // namespace

const MicroTable& avx2_micro_table() {
  static const MicroTable table = MicroTableBuilder<Avx2, 6, 2>::build();
  return table;
}

}  // namespace loopmoe::model::ops::cpu
