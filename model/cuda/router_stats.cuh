// The router's batch statistics on the device (ops.h router_stats): each expert's top-k
// assignments, Σ_t p_te and Σ_t lse_t² in ops::LossSum's fixed point, so that only 3·E + 2
// numbers are the result, on the device, instead of the S·E probabilities. In a header of its own,
// like flash_attention.cuh, so that it also runs under tests/cuda_emulation/ against the CPU's
// router_stats where no GPU is present: no CUDA API call here, the shared memory behind a macro.
#pragma once

#include <cmath>
#include <cstdint>

#ifndef LOOPMOE_DYNAMIC_SHARED
#define LOOPMOE_DYNAMIC_SHARED(name) extern __shared__ __align__(128) float name[]
#endif

namespace loopmoe::model::ops::cuda::router {

// A LossSum in the making: units of 2^-30, and the rows that could not be counted.
struct FixedSum {
  long long units;
  long long invalid;
};

// LossSum::add_row's arithmetic (model/cpu/ops_attention.cc): a row of magnitude 2^20 or more, or
// NaN, is invalid; else its units, rounded to nearest even, are added; an overflow makes the sum
// invalid. Every value summed here (probabilities, squares) is ≥ 0 or NaN, so the running sum only
// grows and overflows exactly when the total does, in whatever order the rows are added: the
// per-thread sums and their tree below give the CPU's units, and an invalid sum wherever the CPU's
// is (the number of invalid rows exactly, an overflow counted once per partial sum that saw it).
__device__ inline void add_units(FixedSum& sum, long long units) {
  constexpr long long kMax = 0x7fffffffffffffffLL, kMin = -kMax - 1;
  if ((units > 0 && sum.units > kMax - units) || (units < 0 && sum.units < kMin - units)) {
    ++sum.invalid;  // and wrap, as __builtin_add_overflow leaves it
    sum.units = static_cast<long long>(static_cast<unsigned long long>(sum.units) +
                                       static_cast<unsigned long long>(units));
    return;
  }
  sum.units += units;
}
__device__ inline void add_row(FixedSum& sum, double x) {
  if (!(fabs(x) < 0x1p20)) {
    ++sum.invalid;
    return;
  }
  add_units(sum, static_cast<long long>(nearbyint(x * 0x1p30)));
}

constexpr int kThreads = 256;
constexpr int kSharedFloats = 3 * kThreads * 2;  // three long long per thread

// Block b < E: expert b's assignments (slots i with expert[i] == b) and Σ_t probs[t][b]; block E:
// Σ_t lse_t². Thread j takes rows j, j + kThreads, ... in order; the block adds the threads' sums
// in a fixed tree. prob_sum, assigned: E each; lse_sq_sum: one.
__global__ void router_stats_kernel(FixedSum* prob_sum, FixedSum* lse_sq_sum, long long* assigned,
                                    const int32_t* expert, const float* probs, const float* lse,
                                    int S, int E, int k) {
  LOOPMOE_DYNAMIC_SHARED(smem);
  long long* units = reinterpret_cast<long long*>(smem);  // [kThreads]
  long long* invalid = units + kThreads;                  // [kThreads]
  long long* count = invalid + kThreads;                  // [kThreads]
  const int b = blockIdx.x, j = threadIdx.x;
  FixedSum sum{0, 0};
  long long n = 0;
  if (b < E) {
    for (int t = j; t < S; t += kThreads) add_row(sum, probs[static_cast<size_t>(t) * E + b]);
    const size_t slots = static_cast<size_t>(S) * k;
    for (size_t i = j; i < slots; i += kThreads) n += expert[i] == b;
  } else {
    for (int t = j; t < S; t += kThreads) add_row(sum, static_cast<double>(lse[t]) * lse[t]);
  }
  units[j] = sum.units;
  invalid[j] = sum.invalid;
  count[j] = n;
  for (int half = kThreads / 2; half > 0; half /= 2) {
    __syncthreads();
    if (j < half) {
      FixedSum a{units[j], invalid[j] + invalid[j + half]};
      add_units(a, units[j + half]);
      units[j] = a.units;
      invalid[j] = a.invalid;
      count[j] += count[j + half];
    }
  }
  if (j == 0) {
    if (b < E) {
      prob_sum[b] = FixedSum{units[0], invalid[0]};
      assigned[b] = count[0];
    } else {
      *lse_sq_sum = FixedSum{units[0], invalid[0]};
    }
  }
}

}  // namespace loopmoe::model::ops::cuda::router
