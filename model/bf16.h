// Rounding fp32 to bfloat16 (train.precision = "bf16", docs/CONFIG.md), shared by both backends:
// the CPU emulation (model/cpu/ops_gemm.cc rounds a product's operands with it, then runs the fp32
// sgemm) and the CUDA backend (model/cuda/ops_gemm.cu converts operands to __nv_bfloat16 with the
// same bits), so the CPU is the GPU's oracle bit for bit up to the order of the fp32 accumulation.
//
// bfloat16 is fp32's upper 16 bits (sign, 8 exponent bits, 7 mantissa bits). The rounding is IEEE
// round-to-nearest, ties to even, on the bit pattern:
// - a value between two bfloat16 values goes to the nearer; halfway, to the one whose last
//   mantissa bit is 0; a carry out of the mantissa moves to the next exponent (exact, the bit
//   pattern is monotonic);
// - ±0 and ±inf stay as they are; denormals round like any other value (bfloat16 has fp32's
//   exponent range, so its denormals are fp32's with 7 mantissa bits: tiny ones become ±0);
// - a finite value at least halfway between bfloat16's largest finite value (0x7F7F, about
//   3.3895e38) and 2^128 rounds to ±inf (overflow, as IEEE and CUDA's __float2bfloat16_rn do):
//   fp32's largest value 0x7F7FFFFF becomes inf;
// - NaN stays NaN: the quiet bit is set before the low half is dropped, so a NaN whose payload
//   lies only in the dropped bits cannot turn into inf; sign and upper payload are kept.
// Integer operations only, so fast-math flags (flush-to-zero) cannot change the result.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define LOOPMOE_BF16_HOST_DEVICE __host__ __device__
#else
#define LOOPMOE_BF16_HOST_DEVICE
#endif

namespace loopmoe::model {

// The fp32 bit pattern of x rounded to bfloat16 (the low 16 bits are zero): the bfloat16 value is
// the upper half, bf16_round_bits(u) >> 16.
LOOPMOE_BF16_HOST_DEVICE constexpr uint32_t bf16_round_bits(uint32_t u) {
  if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu) != 0) {  // NaN: keep it one
    return (u | 0x00400000u) & 0xFFFF0000u;
  }
  // Adding 0x7FFF rounds up anything above halfway; the lowest kept bit adds the last 1 at exactly
  // halfway when it is odd (ties to even). No wrap-around: the largest pattern left here is -inf's,
  // 0xFF800000.
  return (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
}

// x rounded to the nearest bfloat16 value, as a float (exactly representable).
constexpr float round_to_bf16(float x) {
  return std::bit_cast<float>(bf16_round_bits(std::bit_cast<uint32_t>(x)));
}

// dst[i] = round_to_bf16(src[i]) for i < n (dst may be src).
inline void round_to_bf16(const float* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = round_to_bf16(src[i]);
}

// The stored rows x cols matrix at src (row stride ld >= cols) rounded into dst, packed (row
// stride cols): the operand of a bf16 product, copied once per call.
inline void round_to_bf16_packed(const float* src, size_t ld, size_t rows, size_t cols,
                                 float* dst) {
  for (size_t r = 0; r < rows; ++r) round_to_bf16(src + r * ld, dst + r * cols, cols);
}

}  // namespace loopmoe::model
