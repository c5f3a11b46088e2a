// The CUDA attention, softmax and cross-entropy kernels (model/cuda/ops_attention.cu) against the
// CPU. Skipped without a CUDA device.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
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

TEST(CudaAttention, ForwardAndBackward) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  // T above one block's 256 threads for the longest rows; hd not a power of two.
  for (const auto& [B, T, H, hd] : {std::tuple{2, 37, 3, 16}, std::tuple{1, 300, 2, 24}}) {
    SCOPED_TRACE(testing::Message() << "B " << B << " T " << T << " H " << H << " hd " << hd);
    const int inner = H * hd;
    const size_t rows = static_cast<size_t>(B) * T;
    const std::vector<float> qkv = random_floats(rows * 3 * inner, 40);
    const std::vector<float> dout = random_floats(rows * inner, 41);
    std::vector<float> out(rows * inner), att(static_cast<size_t>(B) * H * T * T);
    // The CPU backward's scratch: T·T values per OpenMP thread.
    std::vector<float> dqkv(qkv.size()),
        scratch(static_cast<size_t>(T) * T * omp_get_max_threads());
    ops::attention_forward(out.data(), att.data(), qkv.data(), B, T, H, hd);
    ops::attention_backward(dqkv.data(), scratch.data(), dout.data(), qkv.data(), att.data(), B, T,
                            H, hd);
    check_against_cpu(
        {out, att},
        [&] {
          Buffer<float> dq = upload(qkv), dout_att = device_zeros<float>(out.size());
          Buffer<float> datt = device_zeros<float>(att.size());
          ops::cuda::attention_forward(dout_att.data(), datt.data(), dq.data(), B, T, H, hd);
          return Outputs{download(dout_att), download(datt)};
        },
        kReductionTolerance);
    // The backward from the CPU's probabilities, so that only the backward is compared. dqkv
    // starts as garbage: the backward overwrites it.
    check_against_cpu(
        {dqkv},
        [&] {
          Buffer<float> dq = upload(qkv), dg = upload(dout), datt = upload(att);
          Buffer<float> ddq = upload(random_floats(qkv.size(), 42));
          ops::cuda::attention_backward(ddq.data(), static_cast<float*>(nullptr), dg.data(),
                                        dq.data(), datt.data(), B, T, H, hd);
          return Outputs{download(ddq)};
        },
        kReductionTolerance);
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
