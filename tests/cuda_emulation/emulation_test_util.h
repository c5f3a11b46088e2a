// Helpers of the emulated kernel tests (tests/cuda_emulation/).
#pragma once

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

namespace loopmoe::model::emulation_testing {

// n standard normal values from a fixed seed.
inline std::vector<float> random_floats(size_t n, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(normal(gen));
  return v;
}

}  // namespace loopmoe::model::emulation_testing
