// The fused attention kernels of model/cuda/flash_attention.cuh run under the CPU emulation of
// CUDA (cuda_emulation.h) against the CPU attention (model/cpu/): out, lse and dqkv, in fp32 and
// in bf16, on shapes that exercise partial tiles, padded head sizes and every fused head size.
// Runs everywhere (no GPU, no CUDA toolkit needed); the same kernels on a GPU are
// tests/cuda/test_cuda_attention.cc's.
#include "tests/cuda_emulation/cuda_emulation.h"
// The emulation first: the kernel header uses what it defines.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "model/cuda/flash_attention.cuh"
#include "model/ops.h"
#include "tests/cuda_emulation/emulation_test_util.h"

namespace loopmoe::model {
namespace {

namespace flash = ops::cuda::flash;

using emulation_testing::random_floats;

// |got - want| <= tolerance · (|want| + rms(want)), as tests/cuda/cuda_test_util.h's expect_close.
void expect_close(const std::vector<float>& want, const std::vector<float>& got, double tolerance,
                  const std::string& what) {
  ASSERT_EQ(want.size(), got.size()) << what;
  double sum_sq = 0;
  for (float x : want) sum_sq += static_cast<double>(x) * x;
  const double rms = want.empty() ? 0.0 : std::sqrt(sum_sq / want.size());
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double error = std::abs(static_cast<double>(got[i]) - want[i]);
    if (!(error <= tolerance * (std::abs(static_cast<double>(want[i])) + rms))) {
      if (bad++ == 0) first = i;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << want.size() << " off; first at " << first
                     << ": want " << want[first] << " got " << got[first];
}

struct Attention {
  std::vector<float> out, lse, dqkv;
};

Attention cpu_attention(const std::vector<float>& qkv, const std::vector<float>& dout, int B, int T,
                        int H, int hd) {
  Attention r{std::vector<float>(dout.size()), std::vector<float>(static_cast<size_t>(B) * H * T),
              std::vector<float>(qkv.size())};
  std::vector<float> scratch(static_cast<size_t>(2) * T * T * omp_get_max_threads());
  ops::attention_forward(r.out.data(), r.lse.data(), scratch.data(), qkv.data(), B, T, H, hd);
  ops::attention_backward(r.dqkv.data(), scratch.data(), dout.data(), qkv.data(), r.out.data(),
                          r.lse.data(), B, T, H, hd);
  return r;
}

// The launches of ops_attention.cu's fused_forward/fused_backward, emulated (the SIMT kernels;
// in bf16 they are the reference of the tensor-core kernels, which the GPU runs in bf16). dqkv
// starts as NaN: the backward must overwrite every element.
template <int HDP>
Attention emulated_attention(const std::vector<float>& qkv, const std::vector<float>& dout, int B,
                             int T, int H, int hd, bool bf16) {
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const unsigned tiles = static_cast<unsigned>((T + flash::kTile - 1) / flash::kTile);
  const dim3 grid{tiles, static_cast<unsigned>(B * H), 1};
  Attention r{std::vector<float>(dout.size()), std::vector<float>(static_cast<size_t>(B) * H * T),
              std::vector<float>(qkv.size(), std::nanf(""))};
  cuda_emulation::launch(flash::flash_forward_kernel<HDP>, grid, flash::kFlashThreads,
                         flash::forward_smem_floats(HDP), r.out.data(), r.lse.data(), qkv.data(), T,
                         H, hd, scale, bf16);
  std::vector<float> dsum(r.lse.size());
  cuda_emulation::launch(flash::flash_backward_dot_kernel, dim3{2, 1, 1}, 64, 0, dsum.data(),
                         dout.data(), r.out.data(), B, T, H, hd, bf16);
  cuda_emulation::launch(flash::flash_backward_kv_kernel<HDP>, grid, flash::kFlashThreads,
                         flash::backward_kv_smem_floats(HDP), r.dqkv.data(), dout.data(),
                         qkv.data(), r.lse.data(), dsum.data(), T, H, hd, scale, bf16);
  cuda_emulation::launch(flash::flash_backward_q_kernel<HDP>, grid, flash::kFlashThreads,
                         flash::backward_q_smem_floats(HDP), r.dqkv.data(), dout.data(), qkv.data(),
                         r.lse.data(), dsum.data(), T, H, hd, scale, bf16);
  return r;
}

// The same with the tensor-core kernels (bf16 only).
template <int HDP>
Attention emulated_wmma_attention(const std::vector<float>& qkv, const std::vector<float>& dout,
                                  int B, int T, int H, int hd) {
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const unsigned tiles = static_cast<unsigned>((T + flash::kTile - 1) / flash::kTile);
  const dim3 grid{tiles, static_cast<unsigned>(B * H), 1};
  Attention r{std::vector<float>(dout.size()), std::vector<float>(static_cast<size_t>(B) * H * T),
              std::vector<float>(qkv.size(), std::nanf(""))};
  cuda_emulation::launch(flash::flash_forward_wmma_kernel<HDP>, grid, flash::kWmmaThreads,
                         flash::forward_wmma_smem_floats(HDP), r.out.data(), r.lse.data(),
                         qkv.data(), T, H, hd, scale);
  std::vector<float> dsum(r.lse.size());
  cuda_emulation::launch(flash::flash_backward_dot_kernel, dim3{2, 1, 1}, 64, 0, dsum.data(),
                         dout.data(), r.out.data(), B, T, H, hd, true);
  cuda_emulation::launch(flash::flash_backward_kv_wmma_kernel<HDP>, grid, flash::kWmmaThreads,
                         flash::backward_kv_wmma_smem_floats(HDP), r.dqkv.data(), dout.data(),
                         qkv.data(), r.lse.data(), dsum.data(), T, H, hd, scale);
  cuda_emulation::launch(flash::flash_backward_q_wmma_kernel<HDP>, grid, flash::kWmmaThreads,
                         flash::backward_q_wmma_smem_floats(HDP), r.dqkv.data(), dout.data(),
                         qkv.data(), r.lse.data(), dsum.data(), T, H, hd, scale);
  return r;
}

Attention emulated_wmma(const std::vector<float>& qkv, const std::vector<float>& dout, int B, int T,
                        int H, int hd) {
  if (hd <= 16) return emulated_wmma_attention<16>(qkv, dout, B, T, H, hd);
  if (hd <= 32) return emulated_wmma_attention<32>(qkv, dout, B, T, H, hd);
  if (hd <= 64) return emulated_wmma_attention<64>(qkv, dout, B, T, H, hd);
  return emulated_wmma_attention<128>(qkv, dout, B, T, H, hd);
}

Attention emulated(const std::vector<float>& qkv, const std::vector<float>& dout, int B, int T,
                   int H, int hd, bool bf16) {
  if (hd <= 16) return emulated_attention<16>(qkv, dout, B, T, H, hd, bf16);
  if (hd <= 32) return emulated_attention<32>(qkv, dout, B, T, H, hd, bf16);
  if (hd <= 64) return emulated_attention<64>(qkv, dout, B, T, H, hd, bf16);
  return emulated_attention<128>(qkv, dout, B, T, H, hd, bf16);
}

void check(int B, int T, int H, int hd, bool bf16, double tolerance) {
  SCOPED_TRACE(testing::Message() << "B " << B << " T " << T << " H " << H << " hd " << hd
                                  << (bf16 ? " bf16" : " fp32"));
  const std::vector<float> qkv = random_floats(static_cast<size_t>(B) * T * 3 * H * hd, 7 + T);
  const std::vector<float> dout = random_floats(static_cast<size_t>(B) * T * H * hd, 8 + T);
  ops::MatmulPrecisionScope precision(bf16 ? ops::MatmulPrecision::kBf16
                                           : ops::MatmulPrecision::kFp32);
  const Attention want = cpu_attention(qkv, dout, B, T, H, hd);
  const Attention got = emulated(qkv, dout, B, T, H, hd, bf16);
  expect_close(want.out, got.out, tolerance, "out");
  expect_close(want.lse, got.lse, tolerance, "lse");
  expect_close(want.dqkv, got.dqkv, tolerance, "dqkv");
}

// Partial tiles (T = 5, 70), a sequence of exactly one tile (64) and of two plus one row (129),
// every padded head size (16, 32, 64, 128) with heads that need padding (12, 28, 100), several
// sequences and heads in one call.
TEST(FlashAttentionEmulated, Fp32MatchesTheCpu) {
  for (const auto& [B, T, H, hd] :
       {std::tuple{2, 5, 2, 12}, std::tuple{1, 70, 2, 28}, std::tuple{2, 64, 1, 32},
        std::tuple{1, 129, 1, 64}, std::tuple{1, 66, 1, 100}}) {
    check(B, T, H, hd, false, 1e-4);
  }
}

double rms_difference(const std::vector<float>& a, const std::vector<float>& b) {
  double sum_sq = 0;
  for (size_t i = 0; i < a.size(); ++i) sum_sq += std::pow(static_cast<double>(a[i]) - b[i], 2);
  return std::sqrt(sum_sq / static_cast<double>(a.size()));
}

// bf16: the fused kernels round the same operands as the CPU's emulation (q, k, v, dO, P before
// P·V and dV, dS before dQ and dK), but the forward rounds exp(s − m) where the CPU rounds the
// normalised probabilities, and D = dO·O stands for the CPU's rowsum(dP ⊙ P): equal in exact
// arithmetic, apart at bf16's resolution. So elementwise the two agree to 2e-2 (cancellation in
// dS = P (dP − D) makes single gradient elements the loosest), and as a whole the kernels must
// be much closer to the CPU's bf16 than to its fp32 where the roundings are the same ones (lse:
// q and k; dqkv: all of them), which shows the rounding is where it belongs. (out is not: there
// the different rounding of P is as large as the rounding of the inputs.)
TEST(FlashAttentionEmulated, Bf16MatchesTheCpuEmulation) {
  for (const auto& [B, T, H, hd] : {std::tuple{1, 70, 2, 28}, std::tuple{1, 65, 1, 128}}) {
    SCOPED_TRACE(testing::Message() << "B " << B << " T " << T << " H " << H << " hd " << hd);
    const std::vector<float> qkv = random_floats(static_cast<size_t>(B) * T * 3 * H * hd, 7 + T);
    const std::vector<float> dout = random_floats(static_cast<size_t>(B) * T * H * hd, 8 + T);
    const Attention fp32 = cpu_attention(qkv, dout, B, T, H, hd);
    ops::MatmulPrecisionScope precision(ops::MatmulPrecision::kBf16);
    const Attention want = cpu_attention(qkv, dout, B, T, H, hd);
    const Attention got = emulated(qkv, dout, B, T, H, hd, true);
    expect_close(want.out, got.out, 2e-2, "out");
    expect_close(want.lse, got.lse, 2e-2, "lse");
    expect_close(want.dqkv, got.dqkv, 2e-2, "dqkv");
    for (const auto& [name, w, g, f] : {std::tuple{"lse", &want.lse, &got.lse, &fp32.lse},
                                        std::tuple{"dqkv", &want.dqkv, &got.dqkv, &fp32.dqkv}}) {
      const double to_bf16 = rms_difference(*g, *w), to_fp32 = rms_difference(*g, *f);
      std::printf("%s: rms distance to the CPU's bf16 %.3g, to its fp32 %.3g\n", name, to_bf16,
                  to_fp32);
      EXPECT_LT(to_bf16, 0.5 * to_fp32) << name;
    }
  }
}

// The tensor-core kernels compute the SIMT kernels' bf16 maths (the same roundings) in another
// accumulation order: held to them closely, and to the CPU's bf16 emulation as the SIMT ones are.
TEST(FlashAttentionEmulated, TensorCoreKernelsMatchTheSimtOnesInBf16) {
  for (const auto& [B, T, H, hd] : {std::tuple{2, 5, 2, 12}, std::tuple{1, 70, 2, 28},
                                    std::tuple{1, 129, 1, 64}, std::tuple{1, 65, 1, 128}}) {
    SCOPED_TRACE(testing::Message() << "B " << B << " T " << T << " H " << H << " hd " << hd);
    const std::vector<float> qkv = random_floats(static_cast<size_t>(B) * T * 3 * H * hd, 9 + T);
    const std::vector<float> dout = random_floats(static_cast<size_t>(B) * T * H * hd, 10 + T);
    const Attention simt = emulated(qkv, dout, B, T, H, hd, true);
    const Attention wmma = emulated_wmma(qkv, dout, B, T, H, hd);
    // A probability or dS near a bf16 rounding boundary may round the other way: 1e-3, not 1e-5.
    expect_close(simt.out, wmma.out, 1e-3, "out");
    expect_close(simt.lse, wmma.lse, 1e-5, "lse");
    expect_close(simt.dqkv, wmma.dqkv, 1e-3, "dqkv");
    ops::MatmulPrecisionScope precision(ops::MatmulPrecision::kBf16);
    const Attention cpu = cpu_attention(qkv, dout, B, T, H, hd);
    expect_close(cpu.out, wmma.out, 2e-2, "out against the CPU");
    expect_close(cpu.dqkv, wmma.dqkv, 2e-2, "dqkv against the CPU");
  }
}

}  // namespace
}  // namespace loopmoe::model
