// Helpers shared by the fast-math CPU kernels of model/cpu/ops_*.cc (internal to model/cpu/):
// the vectorisable exp and the sigmoid built on it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace loopmoe::model::ops {
// Internal linkage in every kernel file (as when they lived in one file's anonymous namespace):
// each file's copies are compiled with its own flags, and none is shared between files.
namespace {

// exp for the float hot loops: Cephes' expf polynomial (about 2 ulp), written so that the
// compiler vectorises it; libm's expf is a scalar call per element. Double keeps std::exp, so
// the gradient checks run against libm.
inline float fast_exp(float x) {
  x = std::min(88.3762626647949f, std::max(-87.3365447504f, x));
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
inline double fast_exp(double x) { return std::exp(x); }

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + fast_exp(-x));
}

}  // namespace
}  // namespace loopmoe::model::ops
