// train.precision = "bf16" on the GPU (model/cuda/ops_gemm.cu: bf16 copies of the operands,
// cublasGemmEx / cublasGemmStridedBatchedEx with fp32 compute) held to the CPU emulation
// (model/cpu/ops_gemm.cc, tests/test_bf16.cc), for the next session with a GPU: every test skips
// without a CUDA device.
//
// Tolerances. The products themselves: both sides multiply the same bf16 values (exact in fp32)
// and accumulate in fp32, so only the accumulation order differs: 1e-5 relative, as the fp32
// kernels. The model: CPU and GPU activations differ at fp32 rounding level (~1e-5, different
// exp, sums, products), and an operand that differs by one fp32 ulp can round to the neighbouring
// bf16 value, 2^-8 away, so bf16 amplifies those differences (~1e-3 on the loss after a few
// steps, not the fp32 parity's 1e-4).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "model/buffer.h"
#include "model/cpu/ops_cpu.h"
#include "model/cuda/ops_cuda.h"
#include "model/ops.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/device/device_run.h"

namespace loopmoe::model {
namespace {

using cuda_testing::download;
using cuda_testing::expect_close;
using cuda_testing::expect_same_bits;
using cuda_testing::kElementwiseTolerance;
using cuda_testing::random_floats;
using cuda_testing::upload;
using ops::MatmulPrecision;
using ops::MatmulPrecisionScope;

constexpr double kModelTolerance = 2e-3;

struct GemmCase {
  bool ta, tb;
  int m, n, k;
  float alpha, beta;
};

// Stored operand sizes with leading-dimension gaps (lda = cols + 3, ldb = cols + 5, ldc = n + 2).
struct Shapes {
  int a_rows, a_cols, b_rows, b_cols, lda, ldb, ldc;
  explicit Shapes(const GemmCase& g)
      : a_rows(g.ta ? g.k : g.m),
        a_cols(g.ta ? g.m : g.k),
        b_rows(g.tb ? g.n : g.k),
        b_cols(g.tb ? g.k : g.n),
        lda(a_cols + 3),
        ldb(b_cols + 5),
        ldc(g.n + 2) {}
};

TEST(CudaBf16, GemmMatchesTheCpuEmulation) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const GemmCase cases[] = {{false, false, 37, 29, 53, 1.f, 0.f},
                            {true, false, 16, 40, 70, 0.5f, 1.f},
                            {false, true, 25, 18, 96, 1.f, 0.25f},
                            {true, true, 9, 33, 41, -2.f, 0.f},
                            {false, false, 256, 192, 512, 1.f, 0.f}};
  uint64_t seed = 1;
  for (const GemmCase& g : cases) {
    SCOPED_TRACE(::testing::Message() << "ta " << g.ta << " tb " << g.tb << " m " << g.m);
    const Shapes s(g);
    const std::vector<float> a = random_floats(static_cast<size_t>(s.a_rows) * s.lda, seed++);
    const std::vector<float> b = random_floats(static_cast<size_t>(s.b_rows) * s.ldb, seed++);
    const std::vector<float> c0 = random_floats(static_cast<size_t>(g.m) * s.ldc, seed++);
    MatmulPrecisionScope scope(MatmulPrecision::kBf16);
    std::vector<float> cpu = c0;
    ops::cpu::gemm<float>(g.ta, g.tb, g.m, g.n, g.k, g.alpha, a.data(), s.lda, b.data(), s.ldb,
                          g.beta, cpu.data(), s.ldc);
    auto run_gpu = [&] {
      const Buffer<float> da = upload(a), db = upload(b);
      Buffer<float> dc = upload(c0);
      ops::cuda::gemm<float>(g.ta, g.tb, g.m, g.n, g.k, g.alpha, da.data(), s.lda, db.data(), s.ldb,
                             g.beta, dc.data(), s.ldc);
      return download(dc);
    };
    const std::vector<float> first = run_gpu(), second = run_gpu();
    expect_close(cpu, first, kElementwiseTolerance, "bf16 gemm");
    expect_same_bits(first, second, "bf16 gemm");
    // Not a no-op: the GPU's fp32 product of the same operands differs.
    std::vector<float> fp32;
    {
      MatmulPrecisionScope fp32_scope(MatmulPrecision::kFp32);
      fp32 = run_gpu();
    }
    double max_diff = 0, scale = 0;
    for (size_t i = 0; i < fp32.size(); ++i) {
      max_diff = std::max(max_diff, std::abs(static_cast<double>(fp32[i]) - first[i]));
      scale = std::max(scale, std::abs(static_cast<double>(fp32[i])));
    }
    EXPECT_GT(max_diff, 1e-4 * scale);
  }
}

// The attention kernels' batched product (cublasGemmStridedBatchedEx in bf16) against the CPU
// emulation batch by batch, with overlapping strided operands as attention passes them (the
// heads of one qkv row block: stride hd, leading dimension 3·H·hd).
TEST(CudaBf16, StridedBatchedGemmMatchesTheCpuEmulation) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const int T = 48, H = 4, hd = 16, ld = 3 * H * hd, batch = H;
  const std::vector<float> qkv = random_floats(static_cast<size_t>(T) * ld, 7);
  const float* q = qkv.data();
  const float* k = qkv.data() + H * hd;
  const long long tt = static_cast<long long>(T) * T;
  MatmulPrecisionScope scope(MatmulPrecision::kBf16);
  // Scores S_h = 0.25 Q_h K_h^T for every head h.
  std::vector<float> cpu(static_cast<size_t>(batch) * tt);
  for (int h = 0; h < batch; ++h) {
    ops::cpu::gemm<float>(false, true, T, T, hd, 0.25f, q + h * hd, ld, k + h * hd, ld, 0.f,
                          cpu.data() + h * tt, T);
  }
  auto run_gpu = [&] {
    const Buffer<float> dqkv = upload(qkv);
    Buffer<float> scores(cpu.size(), Device::kCuda);
    ops::cuda::kernel_util::gemm_strided_batched(false, true, T, T, hd, 0.25f, dqkv.data(), ld, hd,
                                                 dqkv.data() + H * hd, ld, hd, 0.f, scores.data(),
                                                 T, tt, batch);
    return download(scores);
  };
  const std::vector<float> first = run_gpu(), second = run_gpu();
  expect_close(cpu, first, kElementwiseTolerance, "bf16 strided batched gemm");
  expect_same_bits(first, second, "bf16 strided batched gemm");
}

// Ten AdamW steps of the tiny models in bf16: GPU against the CPU emulation, and two GPU runs
// bit-identical.
TEST(CudaBf16, TinyTrainingMatchesTheCpuEmulation) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  MatmulPrecisionScope scope(MatmulPrecision::kBf16);
  for (const int variant : {0, 4}) {
    const device_testing::Variant& v = device_testing::tiny_variants()[variant];
    SCOPED_TRACE(v.name);
    const Config cfg = device_testing::variant_config(v);
    const device_testing::RunResult cpu = device_testing::train(cfg, Device::kCpu);
    const device_testing::RunResult gpu = device_testing::train(cfg, Device::kCuda);
    for (int step = 0; step < device_testing::kSteps; ++step) {
      const double want = cpu.losses[6 * step], got = gpu.losses[6 * step];
      EXPECT_TRUE(std::isfinite(got)) << "step " << step;
      EXPECT_NEAR(got, want, kModelTolerance * std::abs(want)) << "loss of step " << step;
    }
    const device_testing::RunResult again = device_testing::train(cfg, Device::kCuda);
    EXPECT_TRUE(device_testing::same_bits(gpu.losses, again.losses)) << "losses";
    EXPECT_TRUE(device_testing::same_bits(gpu.params, again.params)) << "parameters";
  }
}

}  // namespace
}  // namespace loopmoe::model
