// The CUDA attention, softmax and cross-entropy kernels (model/cuda/ops_attention.cu) against the
// CPU. Skipped without a CUDA device.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "model/buffer.h"
#include "model/cuda/ops_cuda.h"
#include "model/ops.h"
#include "tests/cuda/cuda_test_util.h"

namespace loopmoe::model {
namespace {

using cuda_testing::check_against_cpu;
using cuda_testing::device_zeros;
using cuda_testing::download;
using cuda_testing::kElementwiseTolerance;
using cuda_testing::kReductionTolerance;
using cuda_testing::Outputs;
using cuda_testing::random_floats;
using cuda_testing::random_ints;
using cuda_testing::upload;

// The CPU's attention (the flash contract: out and lse forward, dqkv backward).
struct CpuAttention {
  std::vector<float> out, lse, dqkv;
};
CpuAttention cpu_attention(const std::vector<float>& qkv, const std::vector<float>& dout, int B,
                           int T, int H, int hd) {
  CpuAttention r;
  r.out.resize(static_cast<size_t>(B) * T * H * hd);
  r.lse.resize(static_cast<size_t>(B) * H * T);
  r.dqkv.resize(qkv.size());
  // The CPU's temporaries: 2·T·T values per OpenMP thread.
  std::vector<float> scratch(static_cast<size_t>(2) * T * T * omp_get_max_threads());
  ops::attention_forward(r.out.data(), r.lse.data(), scratch.data(), qkv.data(), B, T, H, hd);
  ops::attention_backward(r.dqkv.data(), scratch.data(), dout.data(), qkv.data(), r.out.data(),
                          r.lse.data(), B, T, H, hd);
  return r;
}

enum class Path { kDispatched, kFused, kMaterialized };

// out and lse of one CUDA forward, and dqkv of one CUDA backward run from the given out and lse
// (the CPU's, so that the backward is compared on its own); dqkv starts as garbage, since the
// backward overwrites it.
Outputs cuda_attention(Path path, const std::vector<float>& qkv, const std::vector<float>& dout,
                       const std::vector<float>& out, const std::vector<float>& lse, int B, int T,
                       int H, int hd) {
  Buffer<float> dq = upload(qkv), dg = upload(dout), dout_in = upload(out), dlse_in = upload(lse);
  Buffer<float> dout_att = device_zeros<float>(out.size()), dlse = device_zeros<float>(lse.size());
  Buffer<float> ddq = upload(random_floats(qkv.size(), 42));
  namespace ku = ops::cuda::kernel_util;
  switch (path) {
    case Path::kDispatched:
      ops::cuda::attention_forward(dout_att.data(), dlse.data(), static_cast<float*>(nullptr),
                                   dq.data(), B, T, H, hd);
      ops::cuda::attention_backward(ddq.data(), static_cast<float*>(nullptr), dg.data(), dq.data(),
                                    dout_in.data(), dlse_in.data(), B, T, H, hd);
      break;
    case Path::kFused:
      ku::attention_forward_fused(dout_att.data(), dlse.data(), dq.data(), B, T, H, hd);
      ku::attention_backward_fused(ddq.data(), dg.data(), dq.data(), dout_in.data(), dlse_in.data(),
                                   B, T, H, hd);
      break;
    case Path::kMaterialized:
      ku::attention_forward_materialized(dout_att.data(), dlse.data(), dq.data(), B, T, H, hd);
      ku::attention_backward_materialized(ddq.data(), dg.data(), dq.data(), B, T, H, hd);
      break;
  }
  return Outputs{download(dout_att), download(dlse), download(ddq)};
}

// Shapes: T below, at and above the 64-row tiles and above one row block's 256 threads; head
// sizes padded to each of the fused kernels' 16, 32, 64 and 128, one not a power of two (the
// tiny LoopMoE's 28), and 160 (above the fused kernels: materialized only).
const std::vector<std::tuple<int, int, int, int>> kShapes = {
    {2, 37, 3, 16}, {1, 300, 2, 24},  {2, 64, 2, 28},   {1, 130, 4, 32},
    {2, 65, 1, 64}, {1, 200, 2, 100}, {1, 129, 2, 128}, {1, 70, 2, 160}};

TEST(CudaAttention, EachPathMatchesTheCpu) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  for (const auto& [B, T, H, hd] : kShapes) {
    const std::vector<float> qkv = random_floats(static_cast<size_t>(B) * T * 3 * H * hd, 40);
    const std::vector<float> dout = random_floats(static_cast<size_t>(B) * T * H * hd, 41);
    const CpuAttention cpu = cpu_attention(qkv, dout, B, T, H, hd);
    for (Path path : {Path::kDispatched, Path::kFused, Path::kMaterialized}) {
      if (path == Path::kFused && hd > 128) continue;  // FusedRefusesHeadsAbove128
      SCOPED_TRACE(testing::Message() << "B " << B << " T " << T << " H " << H << " hd " << hd
                                      << " path " << static_cast<int>(path));
      check_against_cpu(
          {cpu.out, cpu.lse, cpu.dqkv},
          [&] { return cuda_attention(path, qkv, dout, cpu.out, cpu.lse, B, T, H, hd); },
          kReductionTolerance);
    }
  }
}

TEST(CudaAttention, FusedRefusesHeadsAbove128) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  Buffer<float> qkv = device_zeros<float>(3 * 160), out = device_zeros<float>(160),
                lse = device_zeros<float>(1);
  EXPECT_THROW(ops::cuda::kernel_util::attention_forward_fused(out.data(), lse.data(), qkv.data(),
                                                               1, 1, 1, 160),
               std::invalid_argument);
  // The dispatched entry falls back to the materialized kernels there.
  ops::cuda::attention_forward(out.data(), lse.data(), static_cast<float*>(nullptr), qkv.data(), 1,
                               1, 1, 160);
  EXPECT_EQ(download(lse)[0], 0.f);  // one key: log 1
}

// bf16 (train.precision = "bf16"): the fused path (the tensor-core kernels in bf16) and the
// materialized one against the CPU's emulation. The fused forward rounds the unnormalised
// probabilities where the CPU rounds the normalised ones, and its D = dO·O stands for the CPU's
// rowsum(dP ⊙ P), so the tolerance is bf16's resolution rather than the accumulation order's
// (tests/cuda_emulation/ measures the same kernels' distance on the CPU).
TEST(CudaAttention, Bf16MatchesTheCpuEmulation) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  ops::MatmulPrecisionScope scope(ops::MatmulPrecision::kBf16);
  for (const auto& [B, T, H, hd] : {std::tuple{2, 37, 3, 16}, std::tuple{1, 130, 2, 64}}) {
    const std::vector<float> qkv = random_floats(static_cast<size_t>(B) * T * 3 * H * hd, 43);
    const std::vector<float> dout = random_floats(static_cast<size_t>(B) * T * H * hd, 44);
    const CpuAttention cpu = cpu_attention(qkv, dout, B, T, H, hd);
    for (Path path : {Path::kFused, Path::kMaterialized}) {
      SCOPED_TRACE(testing::Message() << "B " << B << " T " << T << " H " << H << " hd " << hd
                                      << " path " << static_cast<int>(path));
      check_against_cpu(
          {cpu.out, cpu.lse, cpu.dqkv},
          [&] { return cuda_attention(path, qkv, dout, cpu.out, cpu.lse, B, T, H, hd); }, 2e-2);
    }
  }
}

// Long sequences, where only the fused kernels avoid T×T memory: fused against materialized on
// the GPU (the CPU's T×T scratch per thread would be gigabytes), and a sequence's results
// independent of the other sequences of the call.
TEST(CudaAttention, LongSequencesFusedMatchesMaterialized) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const int B = 2, T = 4096, H = 2, hd = 64;
  const std::vector<float> qkv = random_floats(static_cast<size_t>(B) * T * 3 * H * hd, 45);
  const std::vector<float> dout = random_floats(static_cast<size_t>(B) * T * H * hd, 46);
  const Outputs m = cuda_attention(Path::kMaterialized, qkv, dout, std::vector<float>(dout.size()),
                                   std::vector<float>(static_cast<size_t>(B) * H * T), B, T, H, hd);
  // The fused backward from the materialized forward's out and lse.
  const Outputs f = cuda_attention(Path::kFused, qkv, dout, m[0], m[1], B, T, H, hd);
  cuda_testing::expect_close(m[0], f[0], kReductionTolerance, "out");
  cuda_testing::expect_close(m[1], f[1], kReductionTolerance, "lse");
  cuda_testing::expect_close(m[2], f[2], kReductionTolerance, "dqkv");
  // Sequence 1 alone gives the same bits as in the pair.
  const size_t rows = static_cast<size_t>(T) * 3 * H * hd,
               out_rows = static_cast<size_t>(T) * H * hd;
  const std::vector<float> qkv1(qkv.begin() + rows, qkv.end());
  const std::vector<float> dout1(dout.begin() + out_rows, dout.end());
  const std::vector<float> out1(m[0].begin() + out_rows, m[0].end());
  const std::vector<float> lse1(m[1].begin() + H * T, m[1].end());
  const Outputs one = cuda_attention(Path::kFused, qkv1, dout1, out1, lse1, 1, T, H, hd);
  cuda_testing::expect_same_bits(std::vector<float>(f[0].begin() + out_rows, f[0].end()), one[0],
                                 "out of sequence 1");
  cuda_testing::expect_same_bits(std::vector<float>(f[2].begin() + rows, f[2].end()), one[2],
                                 "dqkv of sequence 1");
}

// At the scale of configs/gpu_small_*.toml (16 sequences × 1024 tokens, 12 heads of 64): the wall
// time of the dispatched (fused) forward + backward in fp32 and bf16, best of three after a
// warm-up, printed for the record beside bench/attention_peer.py's PyTorch SDPA backends (cuDNN's
// fused attention among them) on the same shape: scripts/gpu_check.sh puts both in its log. Its
// only assertion is that the results are finite and run to run identical.
TEST(CudaAttention, TimingAtModelScale) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const int B = 16, T = 1024, H = 12, hd = 64;
  const Buffer<float> qkv = upload(random_floats(static_cast<size_t>(B) * T * 3 * H * hd, 51));
  const Buffer<float> dout = upload(random_floats(static_cast<size_t>(B) * T * H * hd, 52));
  Buffer<float> out = device_zeros<float>(dout.size()), lse = device_zeros<float>(B * H * T);
  Buffer<float> dqkv = device_zeros<float>(qkv.size());
  auto synchronize = [] { ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess); };
  for (const ops::MatmulPrecision precision :
       {ops::MatmulPrecision::kFp32, ops::MatmulPrecision::kBf16}) {
    ops::MatmulPrecisionScope scope(precision);
    std::vector<float> first;
    double best = 1e30;
    for (int run = 0; run < 4; ++run) {  // run 0: the warm-up
      synchronize();
      const auto start = std::chrono::steady_clock::now();
      ops::cuda::attention_forward(out.data(), lse.data(), static_cast<float*>(nullptr), qkv.data(),
                                   B, T, H, hd);
      ops::cuda::attention_backward(dqkv.data(), static_cast<float*>(nullptr), dout.data(),
                                    qkv.data(), out.data(), lse.data(), B, T, H, hd);
      synchronize();
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
              .count();
      if (run > 0) best = std::min(best, ms);
      const std::vector<float> got = download(dqkv);
      if (run == 0) {
        first = got;
        for (float v : got) ASSERT_TRUE(std::isfinite(v));
      } else {
        cuda_testing::expect_same_bits(first, got, "dqkv run to run");
      }
    }
    std::printf(
        "attention at model scale (B %d, T %d, H %d, hd %d) in %s (forward + backward): fused "
        "%.2f ms\n",
        B, T, H, hd, ops::to_string(precision), best);
  }
}

TEST(CudaAttention, Softmax) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  for (const int E : {8, 300}) {
    SCOPED_TRACE(testing::Message() << "E " << E);
    const int S = 45;
    const std::vector<float> logits = random_floats(static_cast<size_t>(S) * E, 43, 3.0);
    const std::vector<float> dprobs = random_floats(logits.size(), 44);
    std::vector<float> probs(logits.size()), lse(S), dlogits(logits.size());
    ops::softmax_forward(probs.data(), lse.data(), logits.data(), S, E);
    ops::softmax_backward(dlogits.data(), dprobs.data(), probs.data(), S, E);
    check_against_cpu(
        {probs, lse, dlogits},
        [&] {
          Buffer<float> dl = upload(logits), ddp = upload(dprobs);
          Buffer<float> dp = device_zeros<float>(probs.size()), dlse = device_zeros<float>(S);
          Buffer<float> ddl = device_zeros<float>(logits.size());
          ops::cuda::softmax_forward(dp.data(), dlse.data(), dl.data(), S, E);
          ops::cuda::softmax_backward(ddl.data(), ddp.data(), dp.data(), S, E);
          return Outputs{download(dp), download(dlse), download(ddl)};
        },
        kReductionTolerance);
  }
}

TEST(CudaAttention, Crossentropy) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const int S = 29, V = 1000;
  const std::vector<float> logits = random_floats(static_cast<size_t>(S) * V, 45, 4.0);
  const std::vector<int32_t> targets = random_ints(S, V, 46);
  const float scale = 1.f / S;
  std::vector<float> probs(logits.size()), dlogits(logits.size());
  const double mean = ops::crossentropy_forward(probs.data(), logits.data(), targets.data(), S, V);
  const ops::LossSum sum =
      ops::crossentropy_forward_sum(probs.data(), logits.data(), targets.data(), S, V);
  ops::crossentropy_backward(dlogits.data(), probs.data(), targets.data(), scale, S, V);
  double cuda_mean[2] = {0, 0};
  ops::LossSum cuda_sum[2];
  int run = 0;
  check_against_cpu(
      {probs, dlogits},
      [&] {
        Buffer<float> dl = upload(logits), dp = device_zeros<float>(probs.size());
        Buffer<float> ddl = device_zeros<float>(logits.size());
        Buffer<int32_t> dt = upload(targets);
        cuda_mean[run % 2] = ops::cuda::crossentropy_forward(dp.data(), dl.data(), dt.data(), S, V);
        cuda_sum[run % 2] =
            ops::cuda::crossentropy_forward_sum(dp.data(), dl.data(), dt.data(), S, V);
        ops::cuda::crossentropy_backward(ddl.data(), dp.data(), dt.data(), scale, S, V);
        ++run;
        return Outputs{download(dp), download(ddl)};
      },
      kReductionTolerance);
  EXPECT_NEAR(cuda_mean[0], mean, 1e-5 * std::abs(mean));
  EXPECT_NEAR(cuda_sum[0].value(), sum.value(), 1e-5 * std::abs(sum.value()));
  EXPECT_EQ(cuda_mean[0], cuda_mean[1]);
  EXPECT_EQ(cuda_sum[0].units, cuda_sum[1].units);
  EXPECT_EQ(cuda_sum[0].invalid, 0);
}

// docs/MODEL.md "Batch-invariant numerics" for the row kernels: rows [7, 7 + 13) computed in a
// call of their own, from a copy one float off the original alignment, have the full call's bits.
TEST(CudaBatchInvariance, RowKernelsDoNotDependOnTheOtherRows) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const int S = 64, D = 300, first = 7, rows = 13;
  const std::vector<float> x = random_floats(static_cast<size_t>(S) * D, 47, 2.0);
  const std::vector<int32_t> targets = random_ints(S, D, 48);
  // The slice, one float into a buffer of its own.
  std::vector<float> slice(1 + static_cast<size_t>(rows) * D, 0.f);
  std::copy_n(x.begin() + static_cast<size_t>(first) * D, static_cast<size_t>(rows) * D,
              slice.begin() + 1);
  const std::vector<int32_t> slice_targets(targets.begin() + first, targets.begin() + first + rows);
  auto run = [&](const std::vector<float>& in, size_t offset, const std::vector<int32_t>& tgt,
                 int n) {
    Buffer<float> din = upload(in), dnorm = device_zeros<float>(in.size());
    Buffer<float> drstd = device_zeros<float>(n), dprobs = device_zeros<float>(in.size());
    Buffer<float> dlse = device_zeros<float>(n), dce = device_zeros<float>(in.size());
    Buffer<int32_t> dt = upload(tgt);
    ops::cuda::rmsnorm_forward(dnorm.data() + offset, drstd.data(), din.data() + offset,
                               static_cast<const float*>(nullptr), n, D);
    ops::cuda::softmax_forward(dprobs.data() + offset, dlse.data(), din.data() + offset, n, D);
    ops::cuda::crossentropy_forward_sum(dce.data() + offset, din.data() + offset, dt.data(), n, D);
    Outputs out;
    for (const Buffer<float>* b : {&dnorm, &dprobs, &dce}) {
      const std::vector<float> all = download(*b);
      out.emplace_back(all.begin() + static_cast<std::ptrdiff_t>(offset), all.end());
    }
    out.push_back(download(drstd));
    out.push_back(download(dlse));
    return out;
  };
  const Outputs full = run(x, 0, targets, S);
  const Outputs part = run(slice, 1, slice_targets, rows);
  for (size_t o = 0; o < full.size(); ++o) {
    const size_t width = o < 3 ? D : 1;
    const std::vector<float> expected(full[o].begin() + first * width,
                                      full[o].begin() + (first + rows) * width);
    cuda_testing::expect_same_bits(expected, part[o], "output " + std::to_string(o));
  }
}

}  // namespace
}  // namespace loopmoe::model
