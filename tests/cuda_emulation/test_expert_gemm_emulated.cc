// The grouped expert products of model/cuda/expert_gemm.cuh (bf16 on the tensor cores, the
// experts' offsets read on the device) under the CPU emulation of CUDA (cuda_emulation.h),
// against a CPU reference that multiplies the same bf16-rounded operands in double: both kinds,
// with and without a transposed B, uneven experts (one without rows, some spanning several tiles,
// none a whole number of tiles), inner and outer sizes that are not whole tiles, rows before the
// first expert, beta 0 over NaN and beta 1. The same kernel on a GPU is
// tests/cuda/test_cuda_moe.cc's (the bf16 experts against the per-expert reference).
#include "tests/cuda_emulation/cuda_emulation.h"
// The emulation first: the kernel header uses what it defines.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "model/bf16.h"
#include "model/cuda/expert_gemm.cuh"
#include "tests/cuda_emulation/emulation_test_util.h"

namespace loopmoe::model {
namespace {

namespace eg = ops::cuda::expert_gemm;

using emulation_testing::random_floats;

double bf16(float x) { return std::bit_cast<float>(bf16_round_bits(std::bit_cast<uint32_t>(x))); }

// The experts' offsets: rows start at `first` (rows before it belong to nobody), expert sizes as
// given.
std::vector<int64_t> offsets(int64_t first, const std::vector<int64_t>& sizes) {
  std::vector<int64_t> o{first};
  for (int64_t n : sizes) o.push_back(o.back() + n);
  return o;
}

void run(eg::Problem p, int64_t rows_bound) {
  const eg::Grid grid = eg::grid_for(p, rows_bound);
  cuda_emulation::launch(eg::expert_gemm_kernel, dim3{grid.x, grid.y, 1}, eg::kThreads,
                         eg::smem_floats(), p);
}

// |got - want| <= tolerance · (|want| + rms(want)) where want is not NaN; NaN where it is.
void expect_close(const std::vector<double>& want, const std::vector<float>& got, double tolerance,
                  const std::string& what) {
  ASSERT_EQ(want.size(), got.size()) << what;
  double sum_sq = 0;
  size_t counted = 0;
  for (double x : want) {
    if (!std::isnan(x)) sum_sq += x * x, ++counted;
  }
  const double rms = counted == 0 ? 0.0 : std::sqrt(sum_sq / counted);
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const bool ok = std::isnan(want[i])
                        ? std::isnan(got[i])
                        : std::abs(got[i] - want[i]) <= tolerance * (std::abs(want[i]) + rms);
    if (!ok && bad++ == 0) first = i;
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << want.size() << " off; first at " << first
                     << ": want " << want[first] << " got " << got[first];
}

// fp32 accumulation of at most a few hundred exact bf16 products against a double sum.
constexpr double kTolerance = 1e-5;

void check_rows(bool trans_b, float beta, const std::vector<int64_t>& o, int N, int K) {
  SCOPED_TRACE(testing::Message() << (trans_b ? "B transposed" : "B as stored") << ", beta " << beta
                                  << ", N " << N << ", K " << K);
  const int E = static_cast<int>(o.size()) - 1;
  const int64_t rows = o.back() + 3;  // rows after the last expert's too: nobody's
  const int lda = K + 5, ldb = (trans_b ? K : N) + 3, ldc = N + 2;
  const long long stride_b = static_cast<long long>(trans_b ? N : K) * ldb + 7;
  const std::vector<float> a = random_floats(rows * lda, 1);
  const std::vector<float> b = random_floats(E * stride_b, 2);
  std::vector<float> c = random_floats(rows * ldc, 3);
  std::vector<double> want(c.begin(), c.end());
  if (beta == 0) {  // C must be written without being read
    for (int64_t r = o.front(); r < o.back(); ++r) {
      for (int j = 0; j < N; ++j) c[r * ldc + j] = std::nanf("");
    }
  }
  const float alpha = 0.75f;
  for (int e = 0; e < E; ++e) {
    for (int64_t r = o[e]; r < o[e + 1]; ++r) {
      for (int j = 0; j < N; ++j) {
        double sum = 0;
        for (int k = 0; k < K; ++k) {
          const size_t bi = e * stride_b + (trans_b ? j * ldb + k : k * ldb + j);
          sum += bf16(a[r * lda + k]) * bf16(b[bi]);
        }
        want[r * ldc + j] = alpha * sum + (beta == 0 ? 0.0 : beta * want[r * ldc + j]);
      }
    }
  }
  eg::Problem p;
  p.kind = eg::Kind::kRows;
  p.trans_b = trans_b;
  p.E = E;
  p.N = N;
  p.K = K;
  p.offset = o.data();
  p.a = a.data();
  p.lda = lda;
  p.b = b.data();
  p.ldb = ldb;
  p.stride_b = stride_b;
  p.c = c.data();
  p.ldc = ldc;
  p.alpha = alpha;
  p.beta = beta;
  // A bound above the rows there are: the blocks past the last expert's last tile do nothing.
  run(p, o.back() - o.front() + 100);
  expect_close(want, c, kTolerance, "C");
}

TEST(ExpertGemmEmulated, RowProductsMatchTheCpu) {
  // Rows from 2 on; experts of 70 (two tiles, the second partial), 0, 5 and 129 rows.
  const std::vector<int64_t> o = offsets(2, {70, 0, 5, 129});
  check_rows(false, 0.f, o, 72, 40);
  check_rows(true, 0.f, o, 72, 40);
  check_rows(true, 1.f, o, 100, 70);
  check_rows(false, 1.f, offsets(0, {1, 64, 0}), 16, 16);
}

void check_weights(float beta, const std::vector<int64_t>& o, int M, int N) {
  SCOPED_TRACE(testing::Message() << "beta " << beta << ", M " << M << ", N " << N);
  const int E = static_cast<int>(o.size()) - 1;
  const int64_t rows = o.back() + eg::kTileK;
  const int lda = M + 3, ldb = N + 1, ldc = N + 5;
  const long long stride_c = static_cast<long long>(M) * ldc + 4;
  std::vector<float> a = random_floats(rows * lda, 4);
  std::vector<float> b = random_floats(rows * ldb, 5);
  // Rows of no expert are NaN: a sum that reached into them would be NaN.
  for (int64_t r = 0; r < rows; ++r) {
    if (r >= o.front() && r < o.back()) continue;
    for (int i = 0; i < lda; ++i) a[r * lda + i] = std::nanf("");
    for (int j = 0; j < ldb; ++j) b[r * ldb + j] = std::nanf("");
  }
  std::vector<float> c = random_floats(E * stride_c, 6);
  std::vector<double> want(c.begin(), c.end());
  for (int e = 0; e < E; ++e) {
    if (o[e + 1] == o[e]) continue;  // no rows: C_e as it was, even under beta 0
    for (int i = 0; i < M; ++i) {
      for (int j = 0; j < N; ++j) {
        double sum = 0;
        for (int64_t r = o[e]; r < o[e + 1]; ++r)
          sum += bf16(a[r * lda + i]) * bf16(b[r * ldb + j]);
        double& w = want[e * stride_c + i * ldc + j];
        w = sum + (beta == 0 ? 0.0 : beta * w);
        if (beta == 0) c[e * stride_c + i * ldc + j] = std::nanf("");
      }
    }
  }
  eg::Problem p;
  p.kind = eg::Kind::kWeights;
  p.E = E;
  p.M = M;
  p.N = N;
  p.offset = o.data();
  p.a = a.data();
  p.lda = lda;
  p.b = b.data();
  p.ldb = ldb;
  p.c = c.data();
  p.ldc = ldc;
  p.stride_c = stride_c;
  p.beta = beta;
  run(p, 0);
  expect_close(want, c, kTolerance, "C");
}

TEST(ExpertGemmEmulated, WeightProductsMatchTheCpu) {
  // Experts of 45 (a partial inner tile), 0 (untouched), 3, 96 (three whole inner tiles) and 90
  // rows.
  const std::vector<int64_t> o = offsets(1, {45, 0, 3, 96, 90});
  check_weights(1.f, o, 72, 40);
  check_weights(0.f, o, 16, 80);
}

// The operands are rounded to bf16: against fp32 operands the same products are visibly off.
TEST(ExpertGemmEmulated, OperandsAreRoundedToBf16) {
  const std::vector<int64_t> o = offsets(0, {64});
  const int K = 64, N = 64;
  const std::vector<float> a = random_floats(64 * K, 7), b = random_floats(K * N, 8);
  std::vector<float> c(64 * N);
  eg::Problem p;
  p.E = 1;
  p.N = N;
  p.K = K;
  p.offset = o.data();
  p.a = a.data();
  p.lda = K;
  p.b = b.data();
  p.ldb = N;
  p.c = c.data();
  p.ldc = N;
  run(p, 64);
  double off_rounded = 0, off_fp32 = 0;
  for (int r = 0; r < 64; ++r) {
    for (int j = 0; j < N; ++j) {
      double rounded = 0, exact = 0;
      for (int k = 0; k < K; ++k) {
        rounded += bf16(a[r * K + k]) * bf16(b[k * N + j]);
        exact += static_cast<double>(a[r * K + k]) * b[k * N + j];
      }
      off_rounded = std::max(off_rounded, std::abs(c[r * N + j] - rounded));
      off_fp32 = std::max(off_fp32, std::abs(c[r * N + j] - exact));
    }
  }
  EXPECT_LT(off_rounded, 1e-4);
  EXPECT_GT(off_fp32, 100 * off_rounded);
}

}  // namespace
}  // namespace loopmoe::model
