// Shared helpers of the CUDA kernel tests (tests/cuda/): the skip without a device, random
// inputs, host <-> device buffers, and the two checks every test makes: the CUDA result is close
// to the CPU result (model/cpu/, the reference), and a second CUDA run gives the same bits.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "model/buffer.h"

namespace loopmoe::model::cuda_testing {

// Every test starts with this: without a device (this includes a machine with the toolkit but no
// GPU or no driver) the test is skipped, with the reason, instead of failing.
#define LOOPMOE_REQUIRE_CUDA_DEVICE()                                                         \
  do {                                                                                        \
    if (!::loopmoe::model::detail::device_available()) {                                      \
      GTEST_SKIP() << "no CUDA device: cudaGetDeviceCount found none (no GPU or no driver); " \
                      "the CUDA kernels are built but cannot run here";                       \
    }                                                                                         \
  } while (0)

// Tolerances of |cuda - cpu| relative to |cpu| + rms(cpu tensor) (see expect_close).
constexpr double kElementwiseTolerance = 1e-5;
constexpr double kReductionTolerance = 1e-4;

inline std::vector<float> random_floats(size_t n, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(normal(gen));
  return v;
}

inline std::vector<int32_t> random_ints(size_t n, int32_t bound, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<int32_t> v(n);
  for (int32_t& x : v) x = static_cast<int32_t>(gen() % static_cast<uint64_t>(bound));
  return v;
}

// A device buffer holding `host`.
template <typename T>
Buffer<T> upload(const std::vector<T>& host) {
  Buffer<T> device(0, Device::kCuda);
  copy_from_host(device, host.data(), host.size());
  return device;
}
template <typename T>
Buffer<T> device_zeros(size_t n) {
  return Buffer<T>(n, Device::kCuda);
}
template <typename T>
std::vector<T> download(const Buffer<T>& device) {
  return copy_to_host(device);
}

// |cuda[i] - cpu[i]| <= tolerance * (|cpu[i]| + rms(cpu)): relative, with the tensor's own scale
// as the floor for elements that cancel to near zero.
inline void expect_close(const std::vector<float>& cpu, const std::vector<float>& cuda,
                         double tolerance, const std::string& what) {
  ASSERT_EQ(cpu.size(), cuda.size()) << what;
  double sum_sq = 0;
  for (float x : cpu) sum_sq += static_cast<double>(x) * x;
  const double rms = cpu.empty() ? 0.0 : std::sqrt(sum_sq / cpu.size());
  size_t bad = 0, first_bad = 0;
  double worst = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    const double error = std::abs(static_cast<double>(cuda[i]) - cpu[i]);
    const double allowed = tolerance * (std::abs(static_cast<double>(cpu[i])) + rms);
    const double ratio = error / (allowed > 0 ? allowed : 1e-30);
    if (!(error <= allowed)) {  // NaN fails too
      if (bad++ == 0) first_bad = i;
    }
    if (ratio > worst || std::isnan(ratio)) worst = ratio;
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << cpu.size() << " elements off; first at "
                     << first_bad << ": cpu " << cpu[first_bad] << " cuda " << cuda[first_bad]
                     << "; worst error/allowed " << worst;
}

template <typename T>
void expect_same_bits(const std::vector<T>& a, const std::vector<T>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  EXPECT_TRUE(a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0)
      << what << ": two runs of the CUDA kernel differ";
}

using Outputs = std::vector<std::vector<float>>;

// The CPU's outputs against run_cuda()'s (each uploads its inputs afresh, runs the CUDA op and
// downloads its outputs), then run_cuda() again for bit-identical outputs.
inline void check_against_cpu(const Outputs& cpu, const std::function<Outputs()>& run_cuda,
                              double tolerance) {
  const Outputs first = run_cuda();
  const Outputs second = run_cuda();
  ASSERT_EQ(cpu.size(), first.size());
  for (size_t i = 0; i < cpu.size(); ++i) {
    expect_close(cpu[i], first[i], tolerance, "output " + std::to_string(i));
    expect_same_bits(first[i], second[i], "output " + std::to_string(i));
  }
}

}  // namespace loopmoe::model::cuda_testing
