// Batch-invariant numerics (docs/MODEL.md): a row's result must not depend on how many other rows
// share a kernel call, where the row sits in it, the buffer's alignment, the thread split or the
// CPU kernel. Data-parallel workers and expert shards see other row counts than one process, and
// their curves are held bit for bit to the single process's (tests/dist), so every difference
// here would show there as drift.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "model/cpu/sgemm.h"
#include "model/model.h"
#include "model/ops.h"

namespace loopmoe {
namespace {

std::vector<float> random_floats(size_t n, uint32_t seed, float scale = 1.f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = u(gen);
  return v;
}

bool same_bits(const float* a, const float* b, size_t n) {
  return std::memcmp(a, b, n * sizeof(float)) == 0;
}

// --- cpu::sgemm: every kernel this CPU can run equals the contract's plain loops bit for bit ---

class SgemmKernel : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    best_ = model::ops::cpu::sgemm_kernel_name();
    if (!model::ops::cpu::sgemm_force_kernel(GetParam())) {
      GTEST_SKIP() << "this CPU cannot run the " << GetParam() << " sgemm kernel";
    }
  }
  void TearDown() override { ASSERT_TRUE(model::ops::cpu::sgemm_force_kernel(best_.c_str())); }
  std::string best_;
};

TEST_P(SgemmKernel, EqualsTheFmaChainForEveryShapeTranspositionAndEpilogue) {
  // Edges of every tile size (1, 5, 6, 12, 13 rows; 1, 8, 16, 17, 32, 33 columns), K split into
  // blocks (300, 600 > 256) and K = 0.
  // (Up to 256 rows a row-major B is read in place, above it packed: 300 takes the packed path.)
  const int ms[] = {1, 5, 13, 37, 300};
  const int ns[] = {1, 8, 17, 33, 112};
  const int ks[] = {0, 1, 28, 300, 600};
  const float alphas[] = {1.f, 0.17f};
  const float betas[] = {0.f, 1.f, -0.5f};
  int cases = 0;
  for (int m : ms) {
    for (int n : ns) {
      for (int k : ks) {
        for (int t = 0; t < 4; ++t) {
          const bool ta = t & 1, tb = t & 2;
          // Leading dimensions with padding, so no test relies on packed inputs.
          // (A transposed with a stride that is a multiple of 1024 floats is packed: m = 300.)
          const int lda = ta ? (m == 300 ? 1024 : m + 3) : k + 3;
          const int ldb = (tb ? k : n) + 5, ldc = n + 2;
          const std::vector<float> a = random_floats(static_cast<size_t>(ta ? k : m) * lda + 1, 1);
          const std::vector<float> b = random_floats(static_cast<size_t>(tb ? n : k) * ldb + 1, 2);
          const std::vector<float> c0 = random_floats(static_cast<size_t>(m) * ldc, 3);
          const float alpha = alphas[cases % 2], beta = betas[cases % 3];
          std::vector<float> got = c0, want = c0;
          model::ops::cpu::sgemm(ta, tb, m, n, k, alpha, a.data(), lda, b.data(), ldb, beta,
                                 got.data(), ldc);
          model::ops::cpu::sgemm_reference(ta, tb, m, n, k, alpha, a.data(), lda, b.data(), ldb,
                                           beta, want.data(), ldc);
          ASSERT_TRUE(same_bits(got.data(), want.data(), got.size()))
              << GetParam() << ": m " << m << " n " << n << " k " << k << " ta " << ta << " tb "
              << tb << " alpha " << alpha << " beta " << beta;
          ++cases;
        }
      }
    }
  }
  EXPECT_EQ(cases, 5 * 5 * 5 * 4);
}

TEST_P(SgemmKernel, BetaZeroNeverReadsC) {
  std::vector<float> a = random_floats(12, 4), b = random_floats(12, 5);
  std::vector<float> c(9, std::numeric_limits<float>::quiet_NaN());
  model::ops::cpu::sgemm(false, false, 3, 3, 4, 1.f, a.data(), 4, b.data(), 3, 0.f, c.data(), 3);
  for (float x : c) EXPECT_FALSE(std::isnan(x));
}

INSTANTIATE_TEST_SUITE_P(Kernels, SgemmKernel, ::testing::Values("avx512", "avx2", "portable"),
                         [](const auto& info) { return std::string(info.param); });

TEST(SgemmKernel, EveryKernelGivesTheSameBits) {
  // The contract does not depend on the instruction set, so neither may the numbers.
  const int m = 50, n = 70, k = 270;
  const std::vector<float> a = random_floats(static_cast<size_t>(m) * k, 6);
  const std::vector<float> b = random_floats(static_cast<size_t>(k) * n, 7);
  const std::string best = model::ops::cpu::sgemm_kernel_name();
  std::vector<float> first;
  int ran = 0;
  for (const char* kernel : {"avx512", "avx2", "portable"}) {
    if (!model::ops::cpu::sgemm_force_kernel(kernel)) continue;
    std::vector<float> c(static_cast<size_t>(m) * n);
    model::ops::cpu::sgemm(false, false, m, n, k, 1.f, a.data(), k, b.data(), n, 0.f, c.data(), n);
    if (first.empty()) {
      first = c;
    } else {
      EXPECT_TRUE(same_bits(first.data(), c.data(), c.size())) << kernel;
    }
    ++ran;
  }
  ASSERT_TRUE(model::ops::cpu::sgemm_force_kernel(best.c_str()));
  EXPECT_GE(ran, 1);
}

// --- ops::gemm: rows of a sub-call equal the same rows of the whole call ----------------------

// The row counts the issue names: 1, 7, T, 3T+5 and the full batch, at several offsets, for all
// transpositions, 1 and 2 threads, K in one block and split.
TEST(BatchInvariance, GemmRowsDoNotDependOnTheCall) {
  const int T = 128, B = 8, M = B * T, N = 96;
  for (int k : {128, 520}) {
    for (int t = 0; t < 4; ++t) {
      const bool ta = t & 1, tb = t & 2;
      const int lda = ta ? M : k, ldb = tb ? k : N;
      const std::vector<float> a = random_floats(static_cast<size_t>(M) * k, 10 + t);
      const std::vector<float> b = random_floats(static_cast<size_t>(k) * N, 20 + t);
      std::vector<float> full(static_cast<size_t>(M) * N);
      model::set_num_threads(1);
      model::ops::gemm<float>(ta, tb, M, N, k, 1.f, a.data(), lda, b.data(), ldb, 0.f, full.data(),
                              N);
      for (int threads : {1, 2}) {
        model::set_num_threads(threads);
        for (int rows : {1, 7, T, 3 * T + 5, M}) {
          for (int offset : {0, 3, T + 1}) {
            if (offset + rows > M) continue;
            std::vector<float> part(static_cast<size_t>(rows) * N);
            const float* as = ta ? a.data() + offset : a.data() + static_cast<size_t>(offset) * lda;
            model::ops::gemm<float>(ta, tb, rows, N, k, 1.f, as, lda, b.data(), ldb, 0.f,
                                    part.data(), N);
            EXPECT_TRUE(
                same_bits(part.data(), full.data() + static_cast<size_t>(offset) * N, part.size()))
                << "rows " << rows << " at " << offset << ", k " << k << ", ta " << ta << " tb "
                << tb << ", " << threads << " threads";
          }
        }
      }
      model::set_num_threads(1);
    }
  }
}

// Runs `kernel(out, in, rows)` on all rows and on a slice of them copied to a buffer one float
// off the original alignment; the slice's output must equal the same rows of the whole.
template <typename Kernel>
void expect_row_invariant(int rows_total, int in_width, int out_width, Kernel kernel,
                          const char* what) {
  const std::vector<float> in = random_floats(static_cast<size_t>(rows_total) * in_width, 30, 2.f);
  std::vector<float> out(static_cast<size_t>(rows_total) * out_width);
  kernel(out.data(), in.data(), rows_total);
  for (int rows : {1, 7, rows_total / 2 + 3}) {
    const int offset = rows_total - rows;
    std::vector<float> in_buf(static_cast<size_t>(rows) * in_width + 1);
    std::vector<float> out_buf(static_cast<size_t>(rows) * out_width + 1);
    std::memcpy(in_buf.data() + 1, in.data() + static_cast<size_t>(offset) * in_width,
                static_cast<size_t>(rows) * in_width * sizeof(float));
    kernel(out_buf.data() + 1, in_buf.data() + 1, rows);
    EXPECT_TRUE(same_bits(out_buf.data() + 1, out.data() + static_cast<size_t>(offset) * out_width,
                          static_cast<size_t>(rows) * out_width))
        << what << ": " << rows << " rows";
  }
}

TEST(BatchInvariance, RowKernelsDoNotDependOnTheCall) {
  const int S = 300, D = 128, E = 41, V = 4096;
  const std::vector<float> weight = random_floats(D, 40);
  expect_row_invariant(
      S, D, D,
      [&](float* out, const float* in, int rows) {
        std::vector<float> rstd(rows);
        model::ops::rmsnorm_forward(out, rstd.data(), in, weight.data(), rows, D);
      },
      "rmsnorm_forward");
  // in = [x | dout] per row; out = dinp.
  expect_row_invariant(
      S, 2 * D, D,
      [&](float* out, const float* in, int rows) {
        std::vector<float> x(static_cast<size_t>(rows) * D), g(x.size()), y(x.size()), rstd(rows);
        for (int r = 0; r < rows; ++r) {
          std::memcpy(&x[static_cast<size_t>(r) * D], in + static_cast<size_t>(r) * 2 * D, D * 4);
          std::memcpy(&g[static_cast<size_t>(r) * D], in + static_cast<size_t>(r) * 2 * D + D,
                      D * 4);
        }
        model::ops::rmsnorm_forward(y.data(), rstd.data(), x.data(), weight.data(), rows, D);
        std::fill(out, out + static_cast<size_t>(rows) * D, 0.f);
        model::ops::rmsnorm_backward(out, static_cast<float*>(nullptr), g.data(), x.data(),
                                     weight.data(), rstd.data(), rows, D);
      },
      "rmsnorm_backward");
  expect_row_invariant(
      S, E, E,
      [&](float* out, const float* in, int rows) {
        std::vector<float> lse(rows);
        model::ops::softmax_forward(out, lse.data(), in, rows, E);
      },
      "softmax_forward");
  expect_row_invariant(
      S, V, V,
      [&](float* out, const float* in, int rows) {
        std::vector<int32_t> targets(rows);
        for (int r = 0; r < rows; ++r) targets[r] = (r * 977) % V;
        model::ops::crossentropy_forward(out, in, targets.data(), rows, V);
      },
      "crossentropy_forward (probabilities)");
  const int F = 112;
  const std::vector<float> w1 = random_floats(static_cast<size_t>(D) * F, 41, 0.1f);
  const std::vector<float> w3 = random_floats(static_cast<size_t>(D) * F, 42, 0.1f);
  const std::vector<float> w2 = random_floats(static_cast<size_t>(F) * D, 43, 0.1f);
  expect_row_invariant(
      S, D, D,
      [&](float* out, const float* in, int rows) {
        std::vector<float> h1(static_cast<size_t>(rows) * F), h3(h1.size()), act(h1.size());
        model::ops::swiglu_forward(out, h1.data(), h3.data(), act.data(), in, w1.data(), w3.data(),
                                   w2.data(), rows, D, F);
      },
      "swiglu_forward");
  // in = [x | dout]; out = dx (the expert's input gradient; weight gradients sum over rows).
  expect_row_invariant(
      S, 2 * D, D,
      [&](float* out, const float* in, int rows) {
        std::vector<float> x(static_cast<size_t>(rows) * D), g(x.size()), y(x.size());
        for (int r = 0; r < rows; ++r) {
          std::memcpy(&x[static_cast<size_t>(r) * D], in + static_cast<size_t>(r) * 2 * D, D * 4);
          std::memcpy(&g[static_cast<size_t>(r) * D], in + static_cast<size_t>(r) * 2 * D + D,
                      D * 4);
        }
        std::vector<float> h1(static_cast<size_t>(rows) * F), h3(h1.size()), act(h1.size());
        std::vector<float> dw1(w1.size()), dw3(w3.size()), dw2(w2.size()), scratch(2 * h1.size());
        model::ops::swiglu_forward(y.data(), h1.data(), h3.data(), act.data(), x.data(), w1.data(),
                                   w3.data(), w2.data(), rows, D, F);
        model::ops::swiglu_backward(out, dw1.data(), dw3.data(), dw2.data(), scratch.data(),
                                    g.data(), x.data(), h1.data(), h3.data(), act.data(), w1.data(),
                                    w3.data(), w2.data(), rows, D, F);
      },
      "swiglu_backward (dx)");
  // The MoE combine and the router's top-k (device seam kernels) are row kernels too.
  const int k = 2;
  std::vector<uint8_t> kept(static_cast<size_t>(S) * k, 1);
  for (size_t i = 0; i < kept.size(); i += 5) kept[i] = 0;
  // in = [k expert outputs | k weights] per token; out = y.
  expect_row_invariant(
      S, k * D + k, D,
      [&](float* out, const float* in, int rows) {
        std::vector<float> o(static_cast<size_t>(rows) * k * D), w(static_cast<size_t>(rows) * k);
        for (int r = 0; r < rows; ++r) {
          std::memcpy(&o[static_cast<size_t>(r) * k * D], in + static_cast<size_t>(r) * (k * D + k),
                      k * D * 4);
          std::memcpy(&w[static_cast<size_t>(r) * k],
                      in + static_cast<size_t>(r) * (k * D + k) + k * D, k * 4);
        }
        model::ops::moe_combine_forward(out, o.data(), w.data(), kept.data() + (S - rows) * k, rows,
                                        k, D);
      },
      "moe_combine_forward");
  // in = [k expert outputs | dy] per token; out = [k slot gradients | k weight gradients].
  expect_row_invariant(
      S, k * D + D, k * D + k,
      [&](float* out, const float* in, int rows) {
        std::vector<float> o(static_cast<size_t>(rows) * k * D), g(static_cast<size_t>(rows) * D);
        std::vector<float> w(static_cast<size_t>(rows) * k, 0.75f), d(o.size()), dw(w.size());
        for (int r = 0; r < rows; ++r) {
          std::memcpy(&o[static_cast<size_t>(r) * k * D], in + static_cast<size_t>(r) * (k + 1) * D,
                      k * D * 4);
          std::memcpy(&g[static_cast<size_t>(r) * D],
                      in + static_cast<size_t>(r) * (k + 1) * D + k * D, D * 4);
        }
        model::ops::moe_combine_backward(d.data(), dw.data(), g.data(), o.data(), w.data(),
                                         kept.data() + (S - rows) * k, rows, k, D);
        for (int r = 0; r < rows; ++r) {
          std::memcpy(out + static_cast<size_t>(r) * (k * D + k),
                      &d[static_cast<size_t>(r) * k * D], k * D * 4);
          std::memcpy(out + static_cast<size_t>(r) * (k * D + k) + k * D,
                      &dw[static_cast<size_t>(r) * k], k * 4);
        }
      },
      "moe_combine_backward");
  expect_row_invariant(
      S, E, k,
      [&](float* out, const float* in, int rows) {
        std::vector<float> probs(static_cast<size_t>(rows) * E), lse(rows);
        std::vector<int32_t> expert(static_cast<size_t>(rows) * k);
        model::ops::softmax_forward(probs.data(), lse.data(), in, rows, E);
        model::ops::router_topk_forward(expert.data(), out, probs.data(), rows, E, k, true);
      },
      "router_topk_forward (weights)");
}

TEST(BatchInvariance, AttentionOfASequenceDoesNotDependOnTheBatch) {
  const int B = 5, T = 64, H = 4, hd = 28, inner = H * hd;
  const std::vector<float> qkv = random_floats(static_cast<size_t>(B) * T * 3 * inner, 50);
  std::vector<float> out(static_cast<size_t>(B) * T * inner), lse(static_cast<size_t>(B) * H * T),
      scratch(static_cast<size_t>(omp_get_max_threads()) * T * T);
  model::ops::attention_forward(out.data(), lse.data(), scratch.data(), qkv.data(), B, T, H, hd);
  for (int b : {0, 3}) {  // one sequence alone, from a buffer one float off
    std::vector<float> in(static_cast<size_t>(T) * 3 * inner + 1);
    std::memcpy(in.data() + 1, qkv.data() + static_cast<size_t>(b) * T * 3 * inner,
                static_cast<size_t>(T) * 3 * inner * sizeof(float));
    std::vector<float> o(static_cast<size_t>(T) * inner), l(static_cast<size_t>(H) * T);
    model::ops::attention_forward(o.data(), l.data(), scratch.data(), in.data() + 1, 1, T, H, hd);
    EXPECT_TRUE(same_bits(o.data(), out.data() + static_cast<size_t>(b) * T * inner, o.size()))
        << "sequence " << b;
    EXPECT_TRUE(same_bits(l.data(), lse.data() + static_cast<size_t>(b) * H * T, l.size()))
        << "sequence " << b;
  }
}

TEST(BatchInvariance, LossSumsDoNotDependOnTheSplit) {
  const std::vector<float> rows = random_floats(1000, 60, 8.f);
  model::ops::LossSum whole;
  for (float x : rows) whole.add_row(std::abs(x));
  for (int parts : {2, 3, 7}) {
    std::vector<model::ops::LossSum> sums(parts);
    for (size_t i = 0; i < rows.size(); ++i)
      sums[i * parts / rows.size()].add_row(std::abs(rows[i]));
    model::ops::LossSum total;
    for (int p = parts - 1; p >= 0; --p) total.add(sums[p]);  // any order
    EXPECT_EQ(total.units, whole.units) << parts << " parts";
    EXPECT_EQ(total.value(), whole.value());
  }
  double plain = 0;
  for (float x : rows) plain += std::abs(x);
  EXPECT_NEAR(whole.value(), plain, rows.size() * model::ops::LossSum::kUnit);
  model::ops::LossSum bad = whole;
  bad.add_row(std::numeric_limits<double>::infinity());
  EXPECT_TRUE(std::isnan(bad.value())) << "a diverged row must show as NaN, not vanish";
  model::ops::LossSum nan;
  nan.add_row(std::nan(""));
  whole.add(nan);
  EXPECT_TRUE(std::isnan(whole.value()));
}

}  // namespace
}  // namespace loopmoe
