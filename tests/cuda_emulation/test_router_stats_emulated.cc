// The router's batch statistics on the device (model/cuda/router_stats.cuh) under the CPU
// emulation of CUDA (cuda_emulation.h), against the CPU's router_stats: the same counts and the
// same fixed-point units exactly, the same invalid rows (NaN, too large), and an overflow of the
// sum seen as one. The same kernel on a GPU is tests/cuda/test_cuda_moe.cc's CudaMoe.Router.
#include "tests/cuda_emulation/cuda_emulation.h"
// The emulation first: the kernel header uses what it defines.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "model/cuda/router_stats.cuh"
#include "model/ops.h"

namespace loopmoe::model {
namespace {

namespace rs = ops::cuda::router;

struct Stats {
  std::vector<int64_t> assigned;
  std::vector<ops::LossSum> prob_sum;
  ops::LossSum lse_sq_sum;
};

Stats emulated(const std::vector<int32_t>& expert, const std::vector<float>& probs,
               const std::vector<float>& lse, int S, int E, int k) {
  std::vector<rs::FixedSum> sums(E, rs::FixedSum{-1, -1});
  rs::FixedSum lse_sq{-1, -1};
  std::vector<long long> assigned(E, -1);
  cuda_emulation::launch(rs::router_stats_kernel, dim3{static_cast<unsigned>(E + 1), 1, 1},
                         rs::kThreads, rs::kSharedFloats, sums.data(), &lse_sq, assigned.data(),
                         expert.data(), probs.data(), lse.data(), S, E, k);
  Stats s{std::vector<int64_t>(assigned.begin(), assigned.end()), std::vector<ops::LossSum>(E), {}};
  for (int e = 0; e < E; ++e) s.prob_sum[e] = {sums[e].units, sums[e].invalid};
  s.lse_sq_sum = {lse_sq.units, lse_sq.invalid};
  return s;
}

Stats cpu(const std::vector<int32_t>& expert, const std::vector<float>& probs,
          const std::vector<float>& lse, int S, int E, int k) {
  Stats s{std::vector<int64_t>(E, -3), std::vector<ops::LossSum>(E, ops::LossSum{5, 5}), {5, 5}};
  ops::router_stats(s.assigned.data(), s.prob_sum.data(), &s.lse_sq_sum, expert.data(),
                    probs.data(), lse.data(), S, E, k);
  return s;
}

// A routing of S tokens over E experts: softmax rows, random top-k choices (distinct per token).
struct Routing {
  std::vector<int32_t> expert;
  std::vector<float> probs, lse;
};
Routing random_routing(int S, int E, int k, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(0.0, 2.0);
  Routing r{std::vector<int32_t>(static_cast<size_t>(S) * k),
            std::vector<float>(static_cast<size_t>(S) * E), std::vector<float>(S)};
  for (int t = 0; t < S; ++t) {
    double sum = 0;
    std::vector<double> x(E);
    for (double& v : x) sum += v = std::exp(normal(gen));
    for (int e = 0; e < E; ++e) r.probs[static_cast<size_t>(t) * E + e] = x[e] / sum;
    r.lse[t] = static_cast<float>(std::log(sum));
    for (int j = 0; j < k; ++j) r.expert[static_cast<size_t>(t) * k + j] = (t + 3 * j) % E;
  }
  return r;
}

void expect_equal(const Stats& want, const Stats& got, bool exact_invalid = true) {
  EXPECT_EQ(got.assigned, want.assigned);
  ASSERT_EQ(got.prob_sum.size(), want.prob_sum.size());
  for (size_t e = 0; e < want.prob_sum.size(); ++e) {
    EXPECT_EQ(got.prob_sum[e].units, want.prob_sum[e].units) << "expert " << e;
    EXPECT_EQ(got.prob_sum[e].invalid, want.prob_sum[e].invalid) << "expert " << e;
  }
  if (exact_invalid) {
    EXPECT_EQ(got.lse_sq_sum.units, want.lse_sq_sum.units);
    EXPECT_EQ(got.lse_sq_sum.invalid, want.lse_sq_sum.invalid);
  }
  EXPECT_EQ(std::isnan(got.lse_sq_sum.value()), std::isnan(want.lse_sq_sum.value()));
}

TEST(RouterStatsEmulated, MatchTheCpuExactly) {
  // Fewer tokens than threads, and several rows per thread with a partial last round.
  for (const auto& [S, E, k] : {std::tuple{100, 5, 2}, std::tuple{1000, 34, 2}}) {
    SCOPED_TRACE(testing::Message() << "S " << S << " E " << E << " k " << k);
    const Routing r = random_routing(S, E, k, 11 + S);
    const Stats want = cpu(r.expert, r.probs, r.lse, S, E, k);
    EXPECT_FALSE(std::isnan(want.lse_sq_sum.value()));
    expect_equal(want, emulated(r.expert, r.probs, r.lse, S, E, k));
  }
}

TEST(RouterStatsEmulated, InvalidRowsAreCountedAsOnTheCpu) {
  const int S = 600, E = 6, k = 1;
  Routing r = random_routing(S, E, k, 3);
  r.probs[7 * E + 2] = std::nanf("");  // expert 2 gets a NaN row
  r.lse[300] = 2048.f;                 // lse² = 2^22: too large for a row
  r.lse[301] = std::nanf("");
  const Stats want = cpu(r.expert, r.probs, r.lse, S, E, k);
  EXPECT_EQ(want.prob_sum[2].invalid, 1);
  EXPECT_EQ(want.lse_sq_sum.invalid, 2);
  expect_equal(want, emulated(r.expert, r.probs, r.lse, S, E, k));
}

TEST(RouterStatsEmulated, AnOverflowingSumIsInvalid) {
  // 9000 rows of lse² just under 2^20 (2^50 units each): the sum passes 2^63.
  const int S = 9000, E = 2, k = 1;
  Routing r = random_routing(S, E, k, 4);
  for (float& x : r.lse) x = 1023.f;
  const Stats want = cpu(r.expert, r.probs, r.lse, S, E, k);
  EXPECT_GT(want.lse_sq_sum.invalid, 0);
  // How many overflows were seen depends on the order of the sum; that the sum is invalid does
  // not.
  expect_equal(want, emulated(r.expert, r.probs, r.lse, S, E, k), /*exact_invalid=*/false);
}

}  // namespace
}  // namespace loopmoe::model
