// sgemm micro-kernels in plain C++ (any CPU): tiles of up to 4 × 8 scalars, each step a std::fma.
// Slow where the CPU has no fused multiply-add (libm then computes it exactly in software), but
// it produces the same bits as the vector kernels.
#include <cmath>

#include "model/cpu/sgemm_kernel.h"

namespace loopmoe::model::ops::cpu {
namespace {

struct Scalar {
  using V = float;
  static constexpr int kWidth = 1;
  static V zero() { return 0.f; }
  static V load(const float* p, int n) { return n > 0 ? *p : 0.f; }
  static void store(float* p, V v, int n) {
    if (n > 0) *p = v;
  }
  static V bcast(const float* p) { return *p; }
  static V fma(V a, V b, V c) { return std::fma(a, b, c); }
  static V mul(V a, V b) { return a * b; }
  static V add(V a, V b) { return a + b; }
};

}  // namespace

const MicroTable& portable_micro_table() {
  static const MicroTable table = MicroTableBuilder<Scalar, 4, 8>::build();
  return table;
}

}  // namespace loopmoe::model::ops::cpu
