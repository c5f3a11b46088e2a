// The CUDA optimiser and row utilities (model/cuda/ops_strict.cu) against the CPU. Skipped
// without a CUDA device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
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

TEST(CudaStrict, RowUtilities) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const int S = 150, D = 70;  // S over two column chunks of 64 rows
  const size_t n = static_cast<size_t>(S) * D;
  const std::vector<float> x0 = random_floats(n, 80), src = random_floats(n, 81);
  const std::vector<float> v = random_floats(D, 82), sums0 = random_floats(D, 83);
  const std::vector<int32_t> mask = random_ints(S, 2, 84);
  std::vector<float> with_row = x0, sums = sums0, added = x0, masked = x0, scaled = x0;
  ops::add_row_vector(with_row.data(), v.data(), S, D);
  ops::sum_rows(sums.data(), src.data(), S, D);
  ops::add_inplace(added.data(), src.data(), n);
  ops::copy_masked_rows(masked.data(), src.data(), mask.data(), S, D);
  ops::scale_inplace(scaled.data(), n, 0.37f);
  check_against_cpu(
      {with_row, added, masked, scaled},
      [&] {
        Buffer<float> dv = upload(v), dsrc = upload(src);
        Buffer<int32_t> dmask = upload(mask);
        Buffer<float> dwith_row = upload(x0), dadded = upload(x0), dmasked = upload(x0),
                      dscaled = upload(x0);
        ops::cuda::add_row_vector(dwith_row.data(), dv.data(), S, D);
        ops::cuda::add_inplace(dadded.data(), dsrc.data(), n);
        ops::cuda::copy_masked_rows(dmasked.data(), dsrc.data(), dmask.data(), S, D);
        ops::cuda::scale_inplace(dscaled.data(), n, 0.37f);
        return Outputs{download(dwith_row), download(dadded), download(dmasked), download(dscaled)};
      },
      kElementwiseTolerance);
  check_against_cpu(
      {sums},
      [&] {
        Buffer<float> dsrc = upload(src), dsums = upload(sums0);
        ops::cuda::sum_rows(dsums.data(), dsrc.data(), S, D);
        return Outputs{download(dsums)};
      },
      kReductionTolerance);
}

TEST(CudaStrict, HaltConvergedRows) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const int S = 64, D = 100;
  const size_t n = static_cast<size_t>(S) * D;
  const std::vector<float> prev = random_floats(n, 85);
  // Row t moves by a relative amount that grows with t: the first rows fall under the threshold.
  const std::vector<float> noise = random_floats(n, 86);
  std::vector<float> cur(n);
  for (size_t i = 0; i < n; ++i) cur[i] = prev[i] + noise[i] * 1e-4f * static_cast<float>(i / D);
  std::vector<int32_t> halted0(S, 0);
  halted0[1] = 2;  // already halted: left alone
  const std::vector<float> frozen0 = random_floats(n, 87);
  std::vector<int32_t> halted = halted0;
  std::vector<float> frozen = frozen0;
  ops::halt_converged_rows(halted.data(), frozen.data(), prev.data(), cur.data(), S, D, 2e-3, 5);
  int halted_now = 0;
  for (int t = 0; t < S; ++t) halted_now += halted[t] == 5;
  ASSERT_GT(halted_now, 0);
  ASSERT_LT(halted_now, S - 1);
  std::vector<std::vector<int32_t>> cuda_halted;
  check_against_cpu(
      {frozen},
      [&] {
        Buffer<int32_t> dhalted = upload(halted0);
        Buffer<float> dfrozen = upload(frozen0), dprev = upload(prev), dcur = upload(cur);
        ops::cuda::halt_converged_rows(dhalted.data(), dfrozen.data(), dprev.data(), dcur.data(), S,
                                       D, 2e-3, 5);
        cuda_halted.push_back(download(dhalted));
        return Outputs{download(dfrozen)};
      },
      0.0);
  EXPECT_EQ(cuda_halted.at(0), halted);
  EXPECT_EQ(cuda_halted.at(1), halted);
}

TEST(CudaStrict, SumSquaresAndAdamW) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const size_t n = 3 * 4096 + 1234;  // several 4096-blocks and a partial one
  const std::vector<float> g = random_floats(n, 88), p0 = random_floats(n, 89);
  const std::vector<float> m0 = random_floats(n, 90, 0.1);
  std::vector<float> v0 = random_floats(n, 91, 0.1);
  for (float& x : v0) x = x * x;
  std::vector<uint8_t> decay(n);
  for (size_t i = 0; i < n; ++i) decay[i] = (i / 1000) % 2;
  const ops::AdamWStep step{0.9f,  0.95f, 1.f / (1.f - 0.9f), 1.f / (1.f - 0.95f), 3e-3f,
                            1e-8f, 0.1f};
  const double sum = ops::sum_squares(g.data(), n);
  std::vector<float> p = p0, m = m0, v = v0;
  ops::adamw_update(p.data(), m.data(), v.data(), g.data(), decay.data(), n, step);
  double cuda_sum[2] = {0, 0};
  int run = 0;
  check_against_cpu(
      {p, m, v},
      [&] {
        Buffer<float> dg = upload(g), dp = upload(p0), dm = upload(m0), dv = upload(v0);
        Buffer<uint8_t> ddecay = upload(decay);
        cuda_sum[run++ % 2] = ops::cuda::sum_squares(dg.data(), n);
        ops::cuda::adamw_update(dp.data(), dm.data(), dv.data(), dg.data(), ddecay.data(), n, step);
        return Outputs{download(dp), download(dm), download(dv)};
      },
      kElementwiseTolerance);
  EXPECT_NEAR(cuda_sum[0], sum, 1e-12 * sum);
  EXPECT_EQ(cuda_sum[0], cuda_sum[1]);
}

}  // namespace
}  // namespace loopmoe::model
