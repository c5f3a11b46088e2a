// Gradient checks (double precision, central differences) of the dense and row kernels in
// model/ops.h: embedding, RMSNorm, matmul, SiLU, AdaLN modulation, RoPE, causal attention, softmax,
// cross-entropy, the SwiGLU expert, the iteration encoding and the grouped weight gradients; and
// the fast GEMM held equal to its naive reference.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "model/ops.h"
#include "tests/grad_check.h"

namespace loopmoe {
namespace {

using testing::dot;
using testing::expect_gradient;
using testing::random_vector;
using V = std::vector<double>;

TEST(Gemm, MatchesReferenceForAllTranspositions) {
  const int m = 7, n = 5, k = 9;
  for (int ta = 0; ta < 2; ++ta) {
    for (int tb = 0; tb < 2; ++tb) {
      std::vector<float> a(m * k), b(k * n), c1(m * n, 0.5f), c2(m * n, 0.5f);
      V ad = random_vector(a.size(), 1), bd = random_vector(b.size(), 2);
      std::copy(ad.begin(), ad.end(), a.begin());
      std::copy(bd.begin(), bd.end(), b.begin());
      const int lda = ta ? m : k, ldb = tb ? k : n;
      model::ops::gemm<float>(ta, tb, m, n, k, 1.5f, a.data(), lda, b.data(), ldb, 0.25f, c1.data(),
                              n);
      model::ops::gemm_reference<float>(ta, tb, m, n, k, 1.5f, a.data(), lda, b.data(), ldb, 0.25f,
                                        c2.data(), n);
      for (int i = 0; i < m * n; ++i) EXPECT_NEAR(c1[i], c2[i], 1e-5) << ta << tb << i;
    }
  }
}

TEST(Gemm, CountsFlops) {
  model::ops::reset_gemm_flops();
  std::vector<float> a(6, 1.f), b(6, 1.f), c(4);
  model::ops::gemm<float>(false, false, 2, 2, 3, 1.f, a.data(), 3, b.data(), 2, 0.f, c.data(), 2);
  EXPECT_EQ(model::ops::gemm_flops(), 2u * 2 * 2 * 3);
  EXPECT_FLOAT_EQ(c[0], 3.f);
}

TEST(GradCheck, Embedding) {
  const int S = 6, D = 4, Vocab = 5;
  std::vector<int32_t> tok = {0, 3, 3, 1, 4, 0};
  V wte = random_vector(Vocab * D, 1), g = random_vector(S * D, 2), out(S * D);
  auto loss = [&] {
    model::ops::embedding_forward(out.data(), tok.data(), wte.data(), S, D);
    return dot(out, g);
  };
  V dwte(wte.size(), 0.0);
  model::ops::embedding_backward(dwte.data(), g.data(), tok.data(), S, D);
  expect_gradient(wte, dwte, loss, "dwte");
}

class RmsNormTest : public ::testing::TestWithParam<bool> {};
TEST_P(RmsNormTest, Gradients) {
  const bool with_weight = GetParam();
  const int S = 5, D = 8;
  V x = random_vector(S * D, 3), w = random_vector(D, 4), g = random_vector(S * D, 5);
  V out(S * D), rstd(S);
  auto loss = [&] {
    model::ops::rmsnorm_forward(out.data(), rstd.data(), x.data(), with_weight ? w.data() : nullptr,
                                S, D);
    return dot(out, g);
  };
  loss();
  V dx(x.size(), 0.0), dw(D, 0.0);
  model::ops::rmsnorm_backward(dx.data(), with_weight ? dw.data() : nullptr, g.data(), x.data(),
                               with_weight ? w.data() : nullptr, rstd.data(), S, D);
  expect_gradient(x, dx, loss, "dx");
  if (with_weight) expect_gradient(w, dw, loss, "dweight");
}
INSTANTIATE_TEST_SUITE_P(Ops, RmsNormTest, ::testing::Bool());

TEST(GradCheck, MatmulWithBias) {
  const int S = 4, I = 6, O = 5;
  V x = random_vector(S * I, 6), w = random_vector(I * O, 7), b = random_vector(O, 8);
  V g = random_vector(S * O, 9), out(S * O);
  auto loss = [&] {
    model::ops::matmul_forward(out.data(), x.data(), w.data(), b.data(), S, I, O);
    return dot(out, g);
  };
  V dx(x.size(), 0.0), dw(w.size(), 0.0), db(O, 0.0);
  model::ops::matmul_backward(dx.data(), dw.data(), db.data(), g.data(), x.data(), w.data(), S, I,
                              O);
  expect_gradient(x, dx, loss, "dx");
  expect_gradient(w, dw, loss, "dw");
  expect_gradient(b, db, loss, "dbias");
}

TEST(GradCheck, Silu) {
  V x = random_vector(20, 10, 4.0), g = random_vector(20, 11), out(20);
  auto loss = [&] {
    model::ops::silu_forward(out.data(), x.data(), x.size());
    return dot(out, g);
  };
  V dx(20, 0.0);
  model::ops::silu_backward(dx.data(), g.data(), x.data(), x.size());
  expect_gradient(x, dx, loss, "dx");
}

TEST(GradCheck, AdaLNModulateAndGatedResidual) {
  const int S = 3, D = 4;
  V n = random_vector(S * D, 12), m = random_vector(S * 3 * D, 13), y = random_vector(S * D, 14);
  V x0 = random_vector(S * D, 15), g = random_vector(S * D, 16), u(S * D), x(S * D);
  // loss = <g, x0 + (1+gate)⊙y> + <y, u(n, m)>: exercises both kernels and every column of m.
  auto loss = [&] {
    x = x0;
    model::ops::gated_residual_forward(x.data(), y.data(), m.data(), S, D);
    model::ops::adaln_modulate_forward(u.data(), n.data(), m.data(), S, D);
    return dot(x, g) + dot(u, y);
  };
  loss();
  V dy(S * D), dm(S * 3 * D, 0.0), dn(S * D, 0.0), dm2(S * 3 * D, 0.0);
  model::ops::gated_residual_backward(dy.data(), dm.data(), g.data(), y.data(), m.data(), S, D);
  model::ops::adaln_modulate_backward(dn.data(), dm2.data(), y.data(), n.data(), m.data(), S, D);
  for (int s = 0; s < S; ++s) {  // gate columns from the residual, shift/scale from modulate
    for (int i = 0; i < 2 * D; ++i) dm[s * 3 * D + i] = dm2[s * 3 * D + i];
  }
  V dyt = dy;
  for (int i = 0; i < S * D; ++i) dyt[i] += u[i];  // y also feeds the <u, y> term
  expect_gradient(m, dm, loss, "dm");
  expect_gradient(n, dn, loss, "dn");
  expect_gradient(y, dyt, loss, "dy");
}

TEST(GradCheck, RopeIsOrthogonalAndDifferentiable) {
  const int B = 2, T = 5, H = 2, hd = 4, I = H * hd;
  V cos_t(T * hd / 2), sin_t(T * hd / 2);
  model::ops::rope_tables(cos_t.data(), sin_t.data(), T, hd, 10000.0);
  V qkv = random_vector(B * T * 3 * I, 17), g = random_vector(qkv.size(), 18), y;
  auto loss = [&] {
    y = qkv;
    model::ops::rope_forward(y.data(), cos_t.data(), sin_t.data(), B, T, H, hd);
    return dot(y, g);
  };
  loss();
  // Norms are preserved and v is untouched.
  double n0 = dot(qkv, qkv), n1 = dot(y, y);
  EXPECT_NEAR(n0, n1, 1e-9 * n0);
  for (int bt = 0; bt < B * T; ++bt) {
    for (int i = 2 * I; i < 3 * I; ++i) {
      EXPECT_EQ(y[bt * 3 * I + i], qkv[bt * 3 * I + i]);
    }
  }
  V dq = g;
  model::ops::rope_backward(dq.data(), cos_t.data(), sin_t.data(), B, T, H, hd);
  expect_gradient(qkv, dq, loss, "dqkv");
}

TEST(GradCheck, CausalAttention) {
  const int B = 2, T = 6, H = 2, hd = 4, I = H * hd;
  V qkv = random_vector(B * T * 3 * I, 19), g = random_vector(B * T * I, 20);
  V out(B * T * I), lse(B * H * T), scratch(size_t(omp_get_max_threads()) * 2 * T * T);
  auto loss = [&] {
    model::ops::attention_forward(out.data(), lse.data(), scratch.data(), qkv.data(), B, T, H, hd);
    return dot(out, g);
  };
  loss();
  // out and lse against the definition: row t attends to keys s <= t only.
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      for (int t = 0; t < T; ++t) {
        const double* q = &qkv[(b * T + t) * 3 * I + h * hd];
        std::vector<double> w(t + 1);
        double z = 0;
        for (int s = 0; s <= t; ++s) {
          const double* k = &qkv[(b * T + s) * 3 * I + I + h * hd];
          double x = 0;
          for (int d = 0; d < hd; ++d) x += q[d] * k[d];
          w[s] = std::exp(x / std::sqrt(double(hd)));
          z += w[s];
        }
        EXPECT_NEAR(lse[(b * H + h) * T + t], std::log(z), 1e-12);
        for (int d = 0; d < hd; ++d) {
          double o = 0;
          for (int s = 0; s <= t; ++s)
            o += w[s] / z * qkv[(b * T + s) * 3 * I + 2 * I + h * hd + d];
          EXPECT_NEAR(out[(b * T + t) * I + h * hd + d], o, 1e-12);
        }
      }
    }
  }
  V dqkv(qkv.size());
  model::ops::attention_backward(dqkv.data(), scratch.data(), g.data(), qkv.data(), out.data(),
                                 lse.data(), B, T, H, hd);
  expect_gradient(qkv, dqkv, loss, "dqkv");
}

// The backward recomputes the forward's scores: those products charge no FLOPs (model FLOPs
// count the forward once), and RecomputeScope is per thread.
TEST(FlopCounters, AttentionBackwardChargesNoRecomputation) {
  const int B = 1, T = 8, H = 2, hd = 4, I = H * hd;
  std::vector<float> qkv(B * T * 3 * I, 0.25f), g(B * T * I, 0.5f), out(B * T * I), lse(B * H * T),
      scratch(static_cast<size_t>(omp_get_max_threads()) * 2 * T * T), dqkv(qkv.size());
  model::ops::reset_gemm_flops();
  model::ops::attention_forward(out.data(), lse.data(), scratch.data(), qkv.data(), B, T, H, hd);
  const uint64_t forward = model::ops::gemm_flops();
  EXPECT_EQ(forward, uint64_t(2) * B * H * 2 * T * T * hd);  // QK^T and PV per head
  model::ops::reset_gemm_flops();
  model::ops::attention_backward(dqkv.data(), scratch.data(), g.data(), qkv.data(), out.data(),
                                 lse.data(), B, T, H, hd);
  EXPECT_EQ(model::ops::gemm_flops(), 2 * forward);  // dP, dV, dQ, dK; not the recomputed QK^T
  {
    model::ops::RecomputeScope recompute;
    model::ops::attention_forward(out.data(), lse.data(), scratch.data(), qkv.data(), B, T, H, hd);
  }
  EXPECT_EQ(model::ops::gemm_flops(), 2 * forward);
}

TEST(GradCheck, SoftmaxAndLogSumExp) {
  const int S = 3, E = 5;
  V logits = random_vector(S * E, 21, 3.0), g = random_vector(S * E, 22), gl = random_vector(S, 23);
  V probs(S * E), lse(S);
  auto loss = [&] {
    model::ops::softmax_forward(probs.data(), lse.data(), logits.data(), S, E);
    return dot(probs, g) + dot(lse, gl);
  };
  loss();
  V dl(S * E);
  model::ops::softmax_backward(dl.data(), g.data(), probs.data(), S, E);
  for (int s = 0; s < S; ++s) {
    for (int e = 0; e < E; ++e) dl[s * E + e] += gl[s] * probs[s * E + e];  // d lse = softmax
  }
  expect_gradient(logits, dl, loss, "dlogits");
}

TEST(GradCheck, CrossEntropy) {
  const int S = 4, Vocab = 7;
  V logits = random_vector(S * Vocab, 24, 2.0), probs(S * Vocab);
  std::vector<int32_t> tg = {1, 6, 0, 3};
  auto loss = [&] {
    return model::ops::crossentropy_forward(probs.data(), logits.data(), tg.data(), S, Vocab);
  };
  const double l = loss();
  double ref = 0;
  for (int s = 0; s < S; ++s) {
    double mx = -1e300, sum = 0;
    for (int v = 0; v < Vocab; ++v) mx = std::max(mx, logits[s * Vocab + v]);
    for (int v = 0; v < Vocab; ++v) sum += std::exp(logits[s * Vocab + v] - mx);
    ref += -(logits[s * Vocab + tg[s]] - mx - std::log(sum)) / S;
  }
  EXPECT_NEAR(l, ref, 1e-12);
  V d(S * Vocab);
  model::ops::crossentropy_backward(d.data(), probs.data(), tg.data(), 1.0 / S, S, Vocab);
  expect_gradient(logits, d, loss, "dlogits");
}

TEST(GradCheck, SwiGLUExpert) {
  const int n = 5, D = 4, F = 6;
  V x = random_vector(n * D, 25), w1 = random_vector(D * F, 26), w3 = random_vector(D * F, 27);
  V w2 = random_vector(F * D, 28), g = random_vector(n * D, 29);
  V out(n * D), h1(n * F), h3(n * F), act(n * F);
  auto loss = [&] {
    model::ops::swiglu_forward(out.data(), h1.data(), h3.data(), act.data(), x.data(), w1.data(),
                               w3.data(), w2.data(), n, D, F);
    return dot(out, g);
  };
  loss();
  V dx(n * D), dw1(D * F, 0.0), dw3(D * F, 0.0), dw2(F * D, 0.0), scratch(2 * n * F);
  model::ops::swiglu_backward(dx.data(), dw1.data(), dw3.data(), dw2.data(), scratch.data(),
                              g.data(), x.data(), h1.data(), h3.data(), act.data(), w1.data(),
                              w3.data(), w2.data(), n, D, F);
  expect_gradient(x, dx, loss, "dx");
  expect_gradient(w1, dw1, loss, "dw1");
  expect_gradient(w3, dw3, loss, "dw3");
  expect_gradient(w2, dw2, loss, "dw2");
}

TEST(IterationEncoding, SinCosPairs) {
  V pe(8);
  model::ops::iteration_encoding(pe.data(), 3, 8);
  EXPECT_NEAR(pe[0], std::sin(3.0), 1e-15);
  EXPECT_NEAR(pe[1], std::cos(3.0), 1e-15);
  EXPECT_NEAR(pe[2], std::sin(3.0 * std::pow(10000.0, -2.0 / 8)), 1e-15);
}

// Grouped weight gradients: each group accumulates its own rows; the tree sum adds the groups
// pairwise. Mathematically the ungrouped gradient (checked in double), and the order is the tree's.
TEST(GradGroups, TreeSumIsPairwise) {
  // In float, 1e8 + 1 == 1e8: sequential ((a+b)+c)+d gives 1, the tree (a+b)+(c+d) gives 0.
  std::vector<float> buf = {1e8f, 1.f, -1e8f, 1.f};
  model::ops::tree_sum_groups(buf.data(), 1, 4, {{0, 1}});
  EXPECT_EQ(buf[0], 0.f);
  // Three groups: (g0) + (g1 + g2).
  std::vector<float> three = {1.f, 1e8f, -1e8f};
  model::ops::tree_sum_groups(three.data(), 1, 3, {{0, 1}});
  EXPECT_EQ(three[0], 1.f);
}

TEST(GradGroups, GroupedBackwardsEqualUngrouped) {
  const int B = 3, T = 2, S = B * T, I = 4, O = 3, D = 4, Vocab = 5;
  const V dout = random_vector(S * O, 41), x = random_vector(S * I, 42),
          w = random_vector(I * O, 43);
  for (int groups : {1, 2, 3}) {
    const size_t stride = I * O + O;
    V buf(groups * stride, 0.0), dx(S * I, 0.0), dx_ref(S * I, 0.0);
    model::ops::GradGroups<double> dw{buf.data(), stride, groups, B, T};
    const model::ops::GradGroups<double> db = dw.shifted(I * O);
    model::ops::matmul_backward(dx.data(), dw, &db, dout.data(), x.data(), w.data(), I, O);
    model::ops::tree_sum_groups(buf.data(), stride, groups, {{0, stride}});
    V dw_ref(I * O, 0.0), db_ref(O, 0.0);
    model::ops::matmul_backward(dx_ref.data(), dw_ref.data(), db_ref.data(), dout.data(), x.data(),
                                w.data(), S, I, O);
    for (int i = 0; i < I * O; ++i) EXPECT_NEAR(buf[i], dw_ref[i], 1e-12) << groups;
    for (int o = 0; o < O; ++o) EXPECT_NEAR(buf[I * O + o], db_ref[o], 1e-12) << groups;
    EXPECT_EQ(dx, dx_ref);

    const V g = random_vector(S * D, 44), xin = random_vector(S * D, 45);
    V rstd(S, 0.7), nbuf(groups * D, 0.0), nref(D, 0.0), din(S * D, 0.0);
    model::ops::rmsnorm_weight_backward(
        model::ops::GradGroups<double>{nbuf.data(), size_t(D), groups, B, T}, g.data(), xin.data(),
        rstd.data(), D);
    model::ops::rmsnorm_backward(din.data(), nref.data(), g.data(), xin.data(), nref.data(),
                                 rstd.data(), S, D);
    model::ops::tree_sum_groups(nbuf.data(), D, groups, {{0, size_t(D)}});
    for (int i = 0; i < D; ++i) EXPECT_NEAR(nbuf[i], nref[i], 1e-12);

    const std::vector<int32_t> tok = {1, 3, 1, 0, 4, 1};
    V ebuf(groups * Vocab * D, 0.0), eref(Vocab * D, 0.0);
    model::ops::embedding_backward(
        model::ops::GradGroups<double>{ebuf.data(), size_t(Vocab * D), groups, B, T}, g.data(),
        tok.data(), D);
    model::ops::embedding_backward(eref.data(), g.data(), tok.data(), S, D);
    model::ops::tree_sum_groups(ebuf.data(), Vocab * D, groups, {{0, size_t(Vocab * D)}});
    for (int i = 0; i < Vocab * D; ++i) EXPECT_NEAR(ebuf[i], eref[i], 1e-12);
  }
}

}  // namespace
}  // namespace loopmoe
