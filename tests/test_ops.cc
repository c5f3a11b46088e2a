// Gradient checks (double precision, central differences) for every kernel in model/ops.h, the
// fast kernels held equal to naive references, the seam's kernels held bit for bit to the loops
// they replaced, and the activation Buffer.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/buffer.h"
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
      ops::gemm<float>(ta, tb, m, n, k, 1.5f, a.data(), lda, b.data(), ldb, 0.25f, c1.data(), n);
      ops::gemm_reference<float>(ta, tb, m, n, k, 1.5f, a.data(), lda, b.data(), ldb, 0.25f,
                                 c2.data(), n);
      for (int i = 0; i < m * n; ++i) EXPECT_NEAR(c1[i], c2[i], 1e-5) << ta << tb << i;
    }
  }
}

TEST(Gemm, CountsFlops) {
  ops::reset_gemm_flops();
  std::vector<float> a(6, 1.f), b(6, 1.f), c(4);
  ops::gemm<float>(false, false, 2, 2, 3, 1.f, a.data(), 3, b.data(), 2, 0.f, c.data(), 2);
  EXPECT_EQ(ops::gemm_flops(), 2u * 2 * 2 * 3);
  EXPECT_FLOAT_EQ(c[0], 3.f);
}

TEST(GradCheck, Embedding) {
  const int S = 6, D = 4, Vocab = 5;
  std::vector<int32_t> tok = {0, 3, 3, 1, 4, 0};
  V wte = random_vector(Vocab * D, 1), g = random_vector(S * D, 2), out(S * D);
  auto loss = [&] {
    ops::embedding_forward(out.data(), tok.data(), wte.data(), S, D);
    return dot(out, g);
  };
  V dwte(wte.size(), 0.0);
  ops::embedding_backward(dwte.data(), g.data(), tok.data(), S, D);
  expect_gradient(wte, dwte, loss, "dwte");
}

class RmsNormTest : public ::testing::TestWithParam<bool> {};
TEST_P(RmsNormTest, Gradients) {
  const bool with_weight = GetParam();
  const int S = 5, D = 8;
  V x = random_vector(S * D, 3), w = random_vector(D, 4), g = random_vector(S * D, 5);
  V out(S * D), rstd(S);
  auto loss = [&] {
    ops::rmsnorm_forward(out.data(), rstd.data(), x.data(), with_weight ? w.data() : nullptr, S, D);
    return dot(out, g);
  };
  loss();
  V dx(x.size(), 0.0), dw(D, 0.0);
  ops::rmsnorm_backward(dx.data(), with_weight ? dw.data() : nullptr, g.data(), x.data(),
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
    ops::matmul_forward(out.data(), x.data(), w.data(), b.data(), S, I, O);
    return dot(out, g);
  };
  V dx(x.size(), 0.0), dw(w.size(), 0.0), db(O, 0.0);
  ops::matmul_backward(dx.data(), dw.data(), db.data(), g.data(), x.data(), w.data(), S, I, O);
  expect_gradient(x, dx, loss, "dx");
  expect_gradient(w, dw, loss, "dw");
  expect_gradient(b, db, loss, "dbias");
}

TEST(GradCheck, Silu) {
  V x = random_vector(20, 10, 4.0), g = random_vector(20, 11), out(20);
  auto loss = [&] {
    ops::silu_forward(out.data(), x.data(), x.size());
    return dot(out, g);
  };
  V dx(20, 0.0);
  ops::silu_backward(dx.data(), g.data(), x.data(), x.size());
  expect_gradient(x, dx, loss, "dx");
}

TEST(GradCheck, AdaLNModulateAndGatedResidual) {
  const int S = 3, D = 4;
  V n = random_vector(S * D, 12), m = random_vector(S * 3 * D, 13), y = random_vector(S * D, 14);
  V x0 = random_vector(S * D, 15), g = random_vector(S * D, 16), u(S * D), x(S * D);
  // loss = <g, x0 + (1+gate)⊙y> + <y, u(n, m)>: exercises both kernels and every column of m.
  auto loss = [&] {
    x = x0;
    ops::gated_residual_forward(x.data(), y.data(), m.data(), S, D);
    ops::adaln_modulate_forward(u.data(), n.data(), m.data(), S, D);
    return dot(x, g) + dot(u, y);
  };
  loss();
  V dy(S * D), dm(S * 3 * D, 0.0), dn(S * D, 0.0), dm2(S * 3 * D, 0.0);
  ops::gated_residual_backward(dy.data(), dm.data(), g.data(), y.data(), m.data(), S, D);
  ops::adaln_modulate_backward(dn.data(), dm2.data(), y.data(), n.data(), m.data(), S, D);
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
  ops::rope_tables(cos_t.data(), sin_t.data(), T, hd, 10000.0);
  V qkv = random_vector(B * T * 3 * I, 17), g = random_vector(qkv.size(), 18), y;
  auto loss = [&] {
    y = qkv;
    ops::rope_forward(y.data(), cos_t.data(), sin_t.data(), B, T, H, hd);
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
  ops::rope_backward(dq.data(), cos_t.data(), sin_t.data(), B, T, H, hd);
  expect_gradient(qkv, dq, loss, "dqkv");
}

TEST(GradCheck, CausalAttention) {
  const int B = 2, T = 6, H = 2, hd = 4, I = H * hd;
  V qkv = random_vector(B * T * 3 * I, 19), g = random_vector(B * T * I, 20);
  V out(B * T * I), att(B * H * T * T);
  auto loss = [&] {
    ops::attention_forward(out.data(), att.data(), qkv.data(), B, T, H, hd);
    return dot(out, g);
  };
  loss();
  // Causality: row t puts no weight on s > t, and rows sum to one.
  for (int bh = 0; bh < B * H; ++bh) {
    for (int t = 0; t < T; ++t) {
      double sum = 0;
      for (int s = 0; s < T; ++s) {
        const double p = att[(bh * T + t) * T + s];
        if (s > t) {
          EXPECT_EQ(p, 0.0);
        }
        sum += p;
      }
      EXPECT_NEAR(sum, 1.0, 1e-12);
    }
  }
  V dqkv(qkv.size()), scratch(64 * T * T);
  ops::attention_backward(dqkv.data(), scratch.data(), g.data(), qkv.data(), att.data(), B, T, H,
                          hd);
  expect_gradient(qkv, dqkv, loss, "dqkv");
}

TEST(GradCheck, SoftmaxAndLogSumExp) {
  const int S = 3, E = 5;
  V logits = random_vector(S * E, 21, 3.0), g = random_vector(S * E, 22), gl = random_vector(S, 23);
  V probs(S * E), lse(S);
  auto loss = [&] {
    ops::softmax_forward(probs.data(), lse.data(), logits.data(), S, E);
    return dot(probs, g) + dot(lse, gl);
  };
  loss();
  V dl(S * E);
  ops::softmax_backward(dl.data(), g.data(), probs.data(), S, E);
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
    return ops::crossentropy_forward(probs.data(), logits.data(), tg.data(), S, Vocab);
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
  ops::crossentropy_backward(d.data(), probs.data(), tg.data(), 1.0 / S, S, Vocab);
  expect_gradient(logits, d, loss, "dlogits");
}

TEST(GradCheck, SwiGLUExpert) {
  const int n = 5, D = 4, F = 6;
  V x = random_vector(n * D, 25), w1 = random_vector(D * F, 26), w3 = random_vector(D * F, 27);
  V w2 = random_vector(F * D, 28), g = random_vector(n * D, 29);
  V out(n * D), h1(n * F), h3(n * F), act(n * F);
  auto loss = [&] {
    ops::swiglu_forward(out.data(), h1.data(), h3.data(), act.data(), x.data(), w1.data(),
                        w3.data(), w2.data(), n, D, F);
    return dot(out, g);
  };
  loss();
  V dx(n * D), dw1(D * F, 0.0), dw3(D * F, 0.0), dw2(F * D, 0.0), scratch(2 * n * F);
  ops::swiglu_backward(dx.data(), dw1.data(), dw3.data(), dw2.data(), scratch.data(), g.data(),
                       x.data(), h1.data(), h3.data(), act.data(), w1.data(), w3.data(), w2.data(),
                       n, D, F);
  expect_gradient(x, dx, loss, "dx");
  expect_gradient(w1, dw1, loss, "dw1");
  expect_gradient(w3, dw3, loss, "dw3");
  expect_gradient(w2, dw2, loss, "dw2");
}

TEST(IterationEncoding, SinCosPairs) {
  V pe(8);
  ops::iteration_encoding(pe.data(), 3, 8);
  EXPECT_NEAR(pe[0], std::sin(3.0), 1e-15);
  EXPECT_NEAR(pe[1], std::cos(3.0), 1e-15);
  EXPECT_NEAR(pe[2], std::sin(3.0 * std::pow(10000.0, -2.0 / 8)), 1e-15);
}

// Grouped weight gradients: each group accumulates its own rows; the tree sum adds the groups
// pairwise. Mathematically the ungrouped gradient (checked in double), and the order is the tree's.
TEST(GradGroups, TreeSumIsPairwise) {
  // In float, 1e8 + 1 == 1e8: sequential ((a+b)+c)+d gives 1, the tree (a+b)+(c+d) gives 0.
  std::vector<float> buf = {1e8f, 1.f, -1e8f, 1.f};
  ops::tree_sum_groups(buf.data(), 1, 4, {{0, 1}});
  EXPECT_EQ(buf[0], 0.f);
  // Three groups: (g0) + (g1 + g2).
  std::vector<float> three = {1.f, 1e8f, -1e8f};
  ops::tree_sum_groups(three.data(), 1, 3, {{0, 1}});
  EXPECT_EQ(three[0], 1.f);
}

TEST(GradGroups, GroupedBackwardsEqualUngrouped) {
  const int B = 3, T = 2, S = B * T, I = 4, O = 3, D = 4, Vocab = 5;
  const V dout = random_vector(S * O, 41), x = random_vector(S * I, 42),
          w = random_vector(I * O, 43);
  for (int groups : {1, 2, 3}) {
    const size_t stride = I * O + O;
    V buf(groups * stride, 0.0), dx(S * I, 0.0), dx_ref(S * I, 0.0);
    ops::GradGroups<double> dw{buf.data(), stride, groups, B, T};
    const ops::GradGroups<double> db = dw.shifted(I * O);
    ops::matmul_backward(dx.data(), dw, &db, dout.data(), x.data(), w.data(), I, O);
    ops::tree_sum_groups(buf.data(), stride, groups, {{0, stride}});
    V dw_ref(I * O, 0.0), db_ref(O, 0.0);
    ops::matmul_backward(dx_ref.data(), dw_ref.data(), db_ref.data(), dout.data(), x.data(),
                         w.data(), S, I, O);
    for (int i = 0; i < I * O; ++i) EXPECT_NEAR(buf[i], dw_ref[i], 1e-12) << groups;
    for (int o = 0; o < O; ++o) EXPECT_NEAR(buf[I * O + o], db_ref[o], 1e-12) << groups;
    EXPECT_EQ(dx, dx_ref);

    const V g = random_vector(S * D, 44), xin = random_vector(S * D, 45);
    V rstd(S, 0.7), nbuf(groups * D, 0.0), nref(D, 0.0), din(S * D, 0.0);
    ops::rmsnorm_weight_backward(ops::GradGroups<double>{nbuf.data(), size_t(D), groups, B, T},
                                 g.data(), xin.data(), rstd.data(), D);
    ops::rmsnorm_backward(din.data(), nref.data(), g.data(), xin.data(), nref.data(), rstd.data(),
                          S, D);
    ops::tree_sum_groups(nbuf.data(), D, groups, {{0, size_t(D)}});
    for (int i = 0; i < D; ++i) EXPECT_NEAR(nbuf[i], nref[i], 1e-12);

    const std::vector<int32_t> tok = {1, 3, 1, 0, 4, 1};
    V ebuf(groups * Vocab * D, 0.0), eref(Vocab * D, 0.0);
    ops::embedding_backward(ops::GradGroups<double>{ebuf.data(), size_t(Vocab * D), groups, B, T},
                            g.data(), tok.data(), D);
    ops::embedding_backward(eref.data(), g.data(), tok.data(), S, D);
    ops::tree_sum_groups(ebuf.data(), Vocab * D, groups, {{0, size_t(Vocab * D)}});
    for (int i = 0; i < Vocab * D; ++i) EXPECT_NEAR(ebuf[i], eref[i], 1e-12);
  }
}

// ---- The device seam's kernels (issue 12): gradient checks of the new ops in double, and each
// float op held bit for bit to a copy of the loop it replaced (model-level code before the seam).

// Copies of the replaced loops, compiled as their files were: moe_layer.cc, router.cc,
// dispatcher.cc and experts.cc with -ffast-math -fno-finite-math-only (model/CMakeLists.txt), so
// that vectorised reductions reassociate the same way; optimizer.cc, iter_adaln.cc and model.cc
// without (the "Strict" copies below).
#pragma GCC push_options
#pragma GCC optimize("fast-math", "no-finite-math-only")
namespace legacy {

void combine_forward(float* y, const std::vector<float>& expert_out,
                     const std::vector<float>& weight, const std::vector<uint8_t>& kept, int S,
                     int k, int D) {
#pragma omp parallel for schedule(static)
  for (int t = 0; t < S; ++t) {
    float* ys = y + static_cast<size_t>(t) * D;
    std::fill_n(ys, D, 0.f);
    for (int j = 0; j < k; ++j) {
      const size_t slot = static_cast<size_t>(t) * k + j;
      if (!kept[slot]) continue;
      const float w = weight[slot];
      const float* o = expert_out.data() + slot * D;
      for (int i = 0; i < D; ++i) ys[i] += w * o[i];
    }
  }
}

void combine_backward(std::vector<float>& dout, std::vector<float>& dweight, const float* dy,
                      const std::vector<float>& expert_out, const std::vector<float>& weight,
                      const std::vector<uint8_t>& kept, int S, int k, int D) {
  dweight.assign(static_cast<size_t>(S) * k, 0.f);
  dout.assign(static_cast<size_t>(S) * k * D, 0.f);
#pragma omp parallel for schedule(static)
  for (int t = 0; t < S; ++t) {
    const float* g = dy + static_cast<size_t>(t) * D;
    for (int j = 0; j < k; ++j) {
      const size_t slot = static_cast<size_t>(t) * k + j;
      if (!kept[slot]) continue;
      const float* o = expert_out.data() + slot * D;
      float* d = dout.data() + slot * D;
      const float w = weight[slot];
      float dot = 0;
      for (int i = 0; i < D; ++i) {
        dot += g[i] * o[i];
        d[i] = w * g[i];
      }
      dweight[slot] = dot;
    }
  }
}

void topk_forward(std::vector<int32_t>& expert, std::vector<float>& weight,
                  const std::vector<float>& probs, int S, int E, int k, bool renormalize) {
  expert.assign(static_cast<size_t>(S) * k, 0);
  weight.assign(static_cast<size_t>(S) * k, 0.f);
#pragma omp parallel for schedule(static)
  for (int t = 0; t < S; ++t) {
    const float* p = probs.data() + static_cast<size_t>(t) * E;
    int32_t* ex = expert.data() + static_cast<size_t>(t) * k;
    float* w = weight.data() + static_cast<size_t>(t) * k;
    for (int j = 0; j < k; ++j) {
      int best = -1;
      for (int e = 0; e < E; ++e) {
        bool taken = false;
        for (int q = 0; q < j; ++q) taken |= (ex[q] == e);
        if (!taken && (best < 0 || p[e] > p[best])) best = e;
      }
      ex[j] = best;
      w[j] = p[best];
    }
    if (renormalize) {
      float sum = 0;
      for (int j = 0; j < k; ++j) sum += w[j];
      for (int j = 0; j < k; ++j) w[j] /= sum;
    }
  }
}

// router_backward's loops up to the router matmul: dlogits from dweight, aux and z terms.
void router_dlogits(std::vector<float>& dlogits, const float* dweight,
                    const std::vector<int32_t>& expert, const std::vector<float>& weight,
                    const std::vector<float>& probs, const std::vector<float>& lse,
                    const std::vector<int64_t>& assigned, int64_t batch_tokens, int S, int E, int k,
                    bool renormalize, double aux_scale, double z_scale) {
  std::vector<float> dprobs(static_cast<size_t>(S) * E, 0.f);
  dlogits.assign(static_cast<size_t>(S) * E, 0.f);
  std::vector<float> aux_grad(E);
  const double batch_S = static_cast<double>(batch_tokens);
  for (int e = 0; e < E; ++e) {
    aux_grad[e] = static_cast<float>(aux_scale * E *
                                     (static_cast<double>(assigned[e]) / (batch_S * k)) / batch_S);
  }
#pragma omp parallel for schedule(static)
  for (int t = 0; t < S; ++t) {
    const float* p = probs.data() + static_cast<size_t>(t) * E;
    float* dp = dprobs.data() + static_cast<size_t>(t) * E;
    const int32_t* ex = expert.data() + static_cast<size_t>(t) * k;
    const float* w = weight.data() + static_cast<size_t>(t) * k;
    const float* dw = dweight + static_cast<size_t>(t) * k;
    if (renormalize) {
      float z = 0, dot = 0;
      for (int j = 0; j < k; ++j) {
        z += p[ex[j]];
        dot += dw[j] * w[j];
      }
      for (int j = 0; j < k; ++j) dp[ex[j]] += (dw[j] - dot) / z;
    } else {
      for (int j = 0; j < k; ++j) dp[ex[j]] += dw[j];
    }
    for (int e = 0; e < E; ++e) dp[e] += aux_grad[e];
  }
  ops::softmax_backward(dlogits.data(), dprobs.data(), probs.data(), S, E);
  if (z_scale != 0) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < S; ++t) {
      const float c = static_cast<float>(z_scale * 2.0 * lse[t] / batch_S);
      const float* p = probs.data() + static_cast<size_t>(t) * E;
      float* dl = dlogits.data() + static_cast<size_t>(t) * E;
      for (int e = 0; e < E; ++e) dl[e] += c * p[e];
    }
  }
}

void router_stats(std::vector<int64_t>& assigned, std::vector<ops::LossSum>& prob_sum,
                  ops::LossSum& lse_sq_sum, const std::vector<int32_t>& expert,
                  const std::vector<float>& probs, const std::vector<float>& lse, int S, int E) {
  for (size_t i = 0; i < expert.size(); ++i) assigned[expert[i]]++;
  for (int t = 0; t < S; ++t) {
    const float* p = probs.data() + static_cast<size_t>(t) * E;
    for (int e = 0; e < E; ++e) prob_sum[e].add_row(p[e]);
    lse_sq_sum.add_row(static_cast<double>(lse[t]) * lse[t]);
  }
}

void gather_slot_rows(float* rows, const float* src, const std::vector<int64_t>& row_of_slot,
                      int per_row, int D) {
  const size_t slots = row_of_slot.size();
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < slots; ++i) {
    if (row_of_slot[i] >= 0) {
      std::copy_n(src + (i / per_row) * D, D, rows + row_of_slot[i] * D);
    }
  }
}

void scatter_slot_rows(float* out, const float* rows, const std::vector<int64_t>& row_of_slot,
                       int D) {
  const size_t slots = row_of_slot.size();
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < slots; ++i) {
    float* o = out + i * D;
    if (row_of_slot[i] >= 0) {
      std::copy_n(rows + row_of_slot[i] * D, D, o);
    } else {
      std::fill_n(o, D, 0.f);
    }
  }
}

void add_slot_rows_to_tokens(float* dx, const float* rows, const std::vector<int64_t>& row_of_slot,
                             int S, int k, int D) {
#pragma omp parallel for schedule(static)
  for (int t = 0; t < S; ++t) {
    float* d = dx + static_cast<size_t>(t) * D;
    for (int j = 0; j < k; ++j) {
      const int64_t r = row_of_slot[static_cast<size_t>(t) * k + j];
      if (r < 0) continue;
      const float* g = rows + r * D;
      for (int i = 0; i < D; ++i) d[i] += g[i];
    }
  }
}

}  // namespace legacy
#pragma GCC pop_options

namespace legacy_strict {

double global_norm(const float* g, size_t n) {
  constexpr size_t kBlock = 4096;
  const size_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(blocks, 0.0);
#pragma omp parallel for schedule(static)
  for (size_t b = 0; b < blocks; ++b) {
    double s = 0;
    for (size_t i = b * kBlock; i < std::min(n, (b + 1) * kBlock); ++i) {
      s += static_cast<double>(g[i]) * g[i];
    }
    partial[b] = s;
  }
  double total = 0;
  for (double s : partial) total += s;
  return std::sqrt(total);
}

void clip_scale(float* g, size_t n, float c) {
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; ++i) g[i] *= c;
}

void adamw(float* p, const float* g, std::vector<float>& m_, std::vector<float>& v_,
           const std::vector<uint8_t>& decay_, const ops::AdamWStep& s,
           const std::vector<std::pair<size_t, size_t>>& ranges) {
  const float b1 = s.beta1, b2 = s.beta2, c1 = s.c1, c2 = s.c2, lrf = s.lr, eps = s.eps;
  const float wd = s.weight_decay;
  for (const auto& [offset, n] : ranges) {
#pragma omp parallel for schedule(static)
    for (size_t i = offset; i < offset + n; ++i) {
      const float gi = g[i];
      m_[i] = b1 * m_[i] + (1.f - b1) * gi;
      v_[i] = b2 * v_[i] + (1.f - b2) * gi * gi;
      const float mh = m_[i] * c1, vh = v_[i] * c2;
      p[i] -= lrf * (mh / (std::sqrt(vh) + eps) + (decay_[i] ? wd * p[i] : 0.f));
    }
  }
}

// model.cc's halting check at the end of iteration r.
void halt(std::vector<uint8_t>& halted, std::vector<int>& iterations, std::vector<float>& frozen,
          const float* prev, const float* cur, int S, int D, double threshold, int r) {
  for (int t = 0; t < S; ++t) {
    if (halted[t]) continue;
    double diff = 0, norm = 0;
    for (int i = 0; i < D; ++i) {
      const double x0 = prev[static_cast<size_t>(t) * D + i];
      const double x1 = cur[static_cast<size_t>(t) * D + i];
      diff += (x1 - x0) * (x1 - x0);
      norm += x0 * x0;
    }
    if (std::sqrt(diff) < threshold * std::sqrt(std::max(norm, 1e-30))) {
      halted[t] = 1;
      iterations[t] = r + 1;
      std::copy_n(cur + static_cast<size_t>(t) * D, D, frozen.data() + static_cast<size_t>(t) * D);
    }
  }
}

}  // namespace legacy_strict

std::vector<float> random_floats(size_t n, uint64_t seed, double scale = 1.0) {
  const V d = random_vector(n, seed, scale);
  return std::vector<float>(d.begin(), d.end());
}

template <typename A, typename B>
bool same_bits(const A& a, const B& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(*a.data())) == 0;
}

// Softmax probabilities of S random rows (distinct values: no ties in the top-k).
std::vector<float> random_probs(int S, int E, uint64_t seed, std::vector<float>* lse = nullptr) {
  const std::vector<float> logits = random_floats(static_cast<size_t>(S) * E, seed, 3.0);
  std::vector<float> probs(logits.size()), l(S);
  ops::softmax_forward(probs.data(), l.data(), logits.data(), S, E);
  if (lse) *lse = l;
  return probs;
}

// A routing of S tokens to k slots with some slots dropped: row_of_slot in expert order.
std::vector<int64_t> random_row_of_slot(int S, int k, uint64_t seed, int64_t* rows) {
  std::mt19937_64 gen(seed);
  std::vector<int64_t> r(static_cast<size_t>(S) * k, -1);
  std::vector<size_t> kept;
  for (size_t i = 0; i < r.size(); ++i) {
    if (gen() % 4 != 0) kept.push_back(i);
  }
  std::vector<int64_t> order(kept.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::shuffle(order.begin(), order.end(), gen);
  for (size_t i = 0; i < kept.size(); ++i) r[kept[i]] = order[i];
  *rows = static_cast<int64_t>(kept.size());
  return r;
}

std::vector<uint8_t> kept_of(const std::vector<int64_t>& row_of_slot) {
  std::vector<uint8_t> kept(row_of_slot.size());
  for (size_t i = 0; i < kept.size(); ++i) kept[i] = row_of_slot[i] >= 0;
  return kept;
}

TEST(SeamBitIdentity, MoeCombineEqualsTheOldMoeLayerLoops) {
  for (int D : {7, 100, 128}) {
    const int S = 37, k = 2;
    int64_t rows = 0;
    const std::vector<uint8_t> kept = kept_of(random_row_of_slot(S, k, D, &rows));
    const std::vector<float> out = random_floats(static_cast<size_t>(S) * k * D, 1);
    const std::vector<float> w = random_floats(static_cast<size_t>(S) * k, 2);
    const std::vector<float> dy = random_floats(static_cast<size_t>(S) * D, 3);
    std::vector<float> y_old(static_cast<size_t>(S) * D), y_new(y_old.size(), 9.f);
    legacy::combine_forward(y_old.data(), out, w, kept, S, k, D);
    ops::moe_combine_forward(y_new.data(), out.data(), w.data(), kept.data(), S, k, D);
    EXPECT_TRUE(same_bits(y_old, y_new)) << "forward D=" << D;
    std::vector<float> d_old, dw_old, d_new(out.size(), 9.f), dw_new(w.size(), 9.f);
    legacy::combine_backward(d_old, dw_old, dy.data(), out, w, kept, S, k, D);
    ops::moe_combine_backward(d_new.data(), dw_new.data(), dy.data(), out.data(), w.data(),
                              kept.data(), S, k, D);
    EXPECT_TRUE(same_bits(d_old, d_new)) << "dexpert_out D=" << D;
    EXPECT_TRUE(same_bits(dw_old, dw_new)) << "dweight D=" << D;
  }
}

TEST(SeamBitIdentity, RouterKernelsEqualTheOldRouterLoops) {
  for (int k : {1, 2, 3}) {
    for (bool renorm : {true, false}) {
      const int S = 53, E = 41;
      std::vector<float> lse;
      const std::vector<float> probs = random_probs(S, E, 10 + k, &lse);
      std::vector<int32_t> ex_old, ex_new(static_cast<size_t>(S) * k);
      std::vector<float> w_old, w_new(ex_new.size());
      legacy::topk_forward(ex_old, w_old, probs, S, E, k, renorm);
      ops::router_topk_forward(ex_new.data(), w_new.data(), probs.data(), S, E, k, renorm);
      EXPECT_EQ(ex_old, ex_new);
      EXPECT_TRUE(same_bits(w_old, w_new)) << "weights k=" << k << " renorm=" << renorm;

      std::vector<int64_t> as_old(E, 0), as_new(E, 0);
      std::vector<ops::LossSum> ps_old(E), ps_new(E);
      ops::LossSum lq_old, lq_new;
      legacy::router_stats(as_old, ps_old, lq_old, ex_old, probs, lse, S, E);
      ops::router_stats(as_new.data(), ps_new.data(), &lq_new, ex_new.data(), probs.data(),
                        lse.data(), S, E, k);
      EXPECT_EQ(as_old, as_new);
      for (int e = 0; e < E; ++e) EXPECT_EQ(ps_old[e].units, ps_new[e].units);
      EXPECT_EQ(lq_old.units, lq_new.units);

      // The backward as router_backward composes it (its host aux coefficients included).
      const std::vector<float> dweight = random_floats(ex_new.size(), 20 + k);
      const int64_t tokens = 2 * S;  // statistics of a larger (distributed) batch
      const double aux_scale = 0.01 / 8, z_scale = 0.001 / 8;
      std::vector<float> dl_old;
      legacy::router_dlogits(dl_old, dweight.data(), ex_old, w_old, probs, lse, as_old, tokens, S,
                             E, k, renorm, aux_scale, z_scale);
      std::vector<float> bias(E), dprobs(probs.size(), 9.f), dl_new(probs.size());
      for (int e = 0; e < E; ++e) {
        bias[e] = static_cast<float>(aux_scale * E *
                                     (static_cast<double>(as_new[e]) / (double(tokens) * k)) /
                                     double(tokens));
      }
      ops::router_topk_backward(dprobs.data(), dweight.data(), probs.data(), ex_new.data(),
                                w_new.data(), bias.data(), S, E, k, renorm);
      ops::softmax_backward(dl_new.data(), dprobs.data(), probs.data(), S, E);
      ops::router_zloss_backward(dl_new.data(), probs.data(), lse.data(), S, E, z_scale,
                                 double(tokens));
      EXPECT_TRUE(same_bits(dl_old, dl_new)) << "dlogits k=" << k << " renorm=" << renorm;
    }
  }
}

TEST(SeamBitIdentity, DispatchRowMovesEqualTheOldDispatcherLoops) {
  const int S = 45, k = 2, D = 33;
  int64_t rows = 0;
  const std::vector<int64_t> ros = random_row_of_slot(S, k, 5, &rows);
  const std::vector<float> x = random_floats(static_cast<size_t>(S) * D, 6);
  const std::vector<float> slot_rows = random_floats(ros.size() * D, 7);
  const std::vector<float> expert_rows = random_floats(static_cast<size_t>(rows) * D, 8);
  for (int per_row : {k, 1}) {
    const float* src = per_row == k ? x.data() : slot_rows.data();
    std::vector<float> a(static_cast<size_t>(rows) * D, 0.f), b = a;
    legacy::gather_slot_rows(a.data(), src, ros, per_row, D);
    if (per_row == k) {
      ops::moe_permute_forward(b.data(), src, ros.data(), ros.size(), k, D);
    } else {
      ops::moe_unpermute_backward(b.data(), src, ros.data(), ros.size(), D);
    }
    EXPECT_TRUE(same_bits(a, b)) << "permute per_row=" << per_row;
  }
  std::vector<float> a(ros.size() * D, 9.f), b(ros.size() * D, 7.f);
  legacy::scatter_slot_rows(a.data(), expert_rows.data(), ros, D);
  ops::moe_unpermute_forward(b.data(), expert_rows.data(), ros.data(), ros.size(), D);
  EXPECT_TRUE(same_bits(a, b)) << "unpermute";
  std::vector<float> dx_old = x, dx_new = x;
  legacy::add_slot_rows_to_tokens(dx_old.data(), expert_rows.data(), ros, S, k, D);
  ops::moe_permute_backward(dx_new.data(), expert_rows.data(), ros.data(), S, k, D);
  EXPECT_TRUE(same_bits(dx_old, dx_new)) << "permute backward";
  // The index permutations of the expert shards: gather then scatter is the identity.
  std::vector<int64_t> index(rows);
  for (int64_t r = 0; r < rows; ++r) index[r] = r;
  std::shuffle(index.begin(), index.end(), std::mt19937_64(8));
  std::vector<float> g(expert_rows.size()), back(expert_rows.size());
  ops::gather_rows(g.data(), expert_rows.data(), index.data(), rows, D);
  for (int64_t r = 0; r < rows; ++r) {
    EXPECT_EQ(0, std::memcmp(&g[r * D], &expert_rows[index[r] * D], D * sizeof(float)));
  }
  ops::scatter_rows(back.data(), g.data(), index.data(), rows, D);
  EXPECT_TRUE(same_bits(back, expert_rows));
}

TEST(SeamBitIdentity, GroupedExpertsEqualOneSwigluPerExpert) {
  const int E = 5, D = 24, F = 20;
  const std::vector<int64_t> offset = {0, 7, 7, 20, 21, 33};  // expert 1 has no rows
  const int64_t rows = offset[E];
  const std::vector<float> x = random_floats(static_cast<size_t>(rows) * D, 30);
  const std::vector<float> dout = random_floats(x.size(), 31);
  const std::vector<float> w1 = random_floats(static_cast<size_t>(E) * D * F, 32, 0.3);
  const std::vector<float> w3 = random_floats(w1.size(), 33, 0.3),
                           w2 = random_floats(w1.size(), 34);
  const size_t RF = static_cast<size_t>(rows) * F;
  std::vector<float> out(x.size()), h1(RF), h3(RF), act(RF), dx(x.size());
  std::vector<float> dw1(w1.size(), 0.f), dw3(dw1), dw2(dw1), scratch(2 * RF);
  ops::experts_swiglu_forward(out.data(), h1.data(), h3.data(), act.data(), x.data(), offset.data(),
                              E, w1.data(), w3.data(), w2.data(), D, F);
  ops::experts_swiglu_backward(dx.data(), dw1.data(), dw3.data(), dw2.data(), scratch.data(),
                               dout.data(), x.data(), h1.data(), h3.data(), act.data(),
                               offset.data(), E, w1.data(), w3.data(), w2.data(), D, F);
  // The old experts.cc called swiglu_forward/backward once per expert on its rows.
  std::vector<float> o2(x.size()), a1(RF), a3(RF), aa(RF), dx2(x.size());
  std::vector<float> e1(w1.size(), 0.f), e3(e1), e2(e1), sc(2 * RF);
  for (int e = 0; e < E; ++e) {
    const int64_t r0 = offset[e];
    const int n = static_cast<int>(offset[e + 1] - r0);
    const size_t wf = static_cast<size_t>(e) * D * F;
    ops::swiglu_forward(o2.data() + r0 * D, a1.data() + r0 * F, a3.data() + r0 * F,
                        aa.data() + r0 * F, x.data() + r0 * D, w1.data() + wf, w3.data() + wf,
                        w2.data() + wf, n, D, F);
    ops::swiglu_backward(dx2.data() + r0 * D, e1.data() + wf, e3.data() + wf, e2.data() + wf,
                         sc.data() + 2 * r0 * F, dout.data() + r0 * D, x.data() + r0 * D,
                         a1.data() + r0 * F, a3.data() + r0 * F, aa.data() + r0 * F, w1.data() + wf,
                         w3.data() + wf, w2.data() + wf, n, D, F);
  }
  EXPECT_TRUE(same_bits(out, o2));
  EXPECT_TRUE(same_bits(act, aa));
  EXPECT_TRUE(same_bits(dx, dx2));
  EXPECT_TRUE(same_bits(dw1, e1));
  EXPECT_TRUE(same_bits(dw3, e3));
  EXPECT_TRUE(same_bits(dw2, e2));
}

TEST(SeamBitIdentity, OptimiserKernelsEqualTheOldOptimizerLoops) {
  const size_t n = 3 * 4096 + 123;
  const std::vector<float> g0 = random_floats(n, 40, 0.1);
  EXPECT_EQ(legacy_strict::global_norm(g0.data(), n), std::sqrt(ops::sum_squares(g0.data(), n)));
  EXPECT_EQ(legacy_strict::global_norm(g0.data(), 1000),
            std::sqrt(ops::sum_squares(g0.data(), 1000)));
  std::vector<float> a = g0, b = g0;
  legacy_strict::clip_scale(a.data(), n, 0.37f);
  ops::scale_inplace(b.data(), n, 0.37f);
  EXPECT_TRUE(same_bits(a, b));
  std::vector<uint8_t> decay(n);
  for (size_t i = 0; i < n; ++i) decay[i] = (i / 1000) % 2;
  const std::vector<std::pair<size_t, size_t>> ranges = {{0, 5000}, {7000, n - 7000}};
  std::vector<float> p_old = random_floats(n, 41), p_new = p_old;
  std::vector<float> m_old(n, 0.f), v_old(n, 0.f), m_new(n, 0.f), v_new(n, 0.f);
  for (int t = 1; t <= 3; ++t) {
    const std::vector<float> g = random_floats(n, 42 + t, 0.1);
    const ops::AdamWStep st{0.9f,
                            0.95f,
                            static_cast<float>(1.0 / (1.0 - std::pow(0.9, t))),
                            static_cast<float>(1.0 / (1.0 - std::pow(0.95, t))),
                            3e-3f,
                            1e-8f,
                            0.1f};
    legacy_strict::adamw(p_old.data(), g.data(), m_old, v_old, decay, st, ranges);
    for (const auto& [offset, len] : ranges) {
      ops::adamw_update(p_new.data() + offset, m_new.data() + offset, v_new.data() + offset,
                        g.data() + offset, decay.data() + offset, len, st);
    }
  }
  EXPECT_TRUE(same_bits(p_old, p_new));
  EXPECT_TRUE(same_bits(m_old, m_new));
  EXPECT_TRUE(same_bits(v_old, v_new));
}

TEST(SeamBitIdentity, HaltingEqualsTheOldModelLoop) {
  const int S = 40, D = 16, R = 4;
  std::vector<uint8_t> halted(S, 0);
  std::vector<int> iterations(S, R);
  std::vector<float> frozen_old(static_cast<size_t>(S) * D), frozen_new(frozen_old.size());
  std::vector<int32_t> halted_at(S, 0);
  std::vector<float> prev = random_floats(frozen_old.size(), 50);
  for (int r = 0; r < R - 1; ++r) {
    std::vector<float> cur = prev;
    const std::vector<float> step = random_floats(cur.size(), 51 + r);
    for (size_t i = 0; i < cur.size(); ++i) cur[i] += step[i] * 0.3f * float((i / D) % 5) / (r + 1);
    legacy_strict::halt(halted, iterations, frozen_old, prev.data(), cur.data(), S, D, 0.2, r);
    ops::halt_converged_rows(halted_at.data(), frozen_new.data(), prev.data(), cur.data(), S, D,
                             0.2, r + 1);
    // The frozen rows go back into the stream (hold_halted).
    std::vector<float> held = cur;
    ops::copy_masked_rows(held.data(), frozen_new.data(), halted_at.data(), S, D);
    for (int t = 0; t < S; ++t) {
      if (halted[t]) std::copy_n(&frozen_old[t * D], D, &cur[t * D]);
    }
    EXPECT_TRUE(same_bits(held, cur));
    prev = cur;
  }
  int halted_count = 0;
  for (int t = 0; t < S; ++t) {
    EXPECT_EQ(halted[t] != 0, halted_at[t] != 0) << t;
    if (halted_at[t]) {
      EXPECT_EQ(iterations[t], halted_at[t]) << t;
    }
    halted_count += halted[t];
  }
  EXPECT_GT(halted_count, 0);
  EXPECT_LT(halted_count, S);
  EXPECT_TRUE(same_bits(frozen_old, frozen_new));
}

// Gradient checks of the seam's new kernels (double instantiations).
TEST(GradCheck, MoeCombine) {
  const int S = 5, k = 2, D = 4;
  const std::vector<uint8_t> kept = {1, 1, 1, 0, 1, 1, 0, 0, 1, 1};
  V out = random_vector(S * k * D, 60), w = random_vector(S * k, 61), g = random_vector(S * D, 62);
  V y(S * D);
  auto loss = [&] {
    ops::moe_combine_forward(y.data(), out.data(), w.data(), kept.data(), S, k, D);
    return dot(y, g);
  };
  V dout(out.size(), 5.0), dw(w.size(), 5.0);
  ops::moe_combine_backward(dout.data(), dw.data(), g.data(), out.data(), w.data(), kept.data(), S,
                            k, D);
  expect_gradient(out, dout, loss, "dexpert_out");
  expect_gradient(w, dw, loss, "dweight");
}

TEST(GradCheck, MoePermuteAndUnpermute) {
  const int S = 6, k = 2, D = 3;
  int64_t rows = 0;
  const std::vector<int64_t> ros = random_row_of_slot(S, k, 63, &rows);
  V x = random_vector(S * D, 64), g = random_vector(rows * D, 65), e = random_vector(rows * D, 66);
  V gs = random_vector(S * k * D, 67), r(rows * D), s(S * k * D);
  auto loss = [&] {  // <permute(x), g> + <unpermute(e), gs>
    ops::moe_permute_forward(r.data(), x.data(), ros.data(), ros.size(), k, D);
    ops::moe_unpermute_forward(s.data(), e.data(), ros.data(), ros.size(), D);
    return dot(r, g) + dot(s, gs);
  };
  V dx(x.size(), 0.0), de(e.size(), 0.0);
  ops::moe_permute_backward(dx.data(), g.data(), ros.data(), S, k, D);
  ops::moe_unpermute_backward(de.data(), gs.data(), ros.data(), ros.size(), D);
  expect_gradient(x, dx, loss, "dx");
  expect_gradient(e, de, loss, "drows");
}

TEST(GradCheck, RouterTopKWithSelectionFixed) {
  for (bool renorm : {true, false}) {
    const int S = 4, E = 6, k = 3;
    V logits = random_vector(S * E, 70, 3.0), probs(S * E), lse(S), w(S * k);
    std::vector<int32_t> ex(S * k), ex0;
    const V dw = random_vector(S * k, 71), bias = random_vector(E, 72);
    auto loss = [&] {  // <weights, dw> + Σ_t <probs_t, bias>, as a function of the probabilities
      ops::router_topk_forward(ex.data(), w.data(), probs.data(), S, E, k, renorm);
      double l = dot(w, dw);
      for (int t = 0; t < S; ++t) {
        for (int e = 0; e < E; ++e) l += probs[t * E + e] * bias[e];
      }
      return l;
    };
    ops::softmax_forward(probs.data(), lse.data(), logits.data(), S, E);
    loss();
    ex0 = ex;
    V dprobs(S * E, 5.0);
    ops::router_topk_backward(dprobs.data(), dw.data(), probs.data(), ex.data(), w.data(),
                              bias.data(), S, E, k, renorm);
    expect_gradient(probs, dprobs, loss, renorm ? "dprobs (renormalised)" : "dprobs");
    EXPECT_EQ(ex, ex0) << "the perturbations changed the selection";
  }
}

TEST(GradCheck, RouterZLoss) {
  const int S = 3, E = 5;
  const double z_scale = 0.7, tokens = 4;
  V logits = random_vector(S * E, 73, 2.0), probs(S * E), lse(S);
  auto loss = [&] {
    ops::softmax_forward(probs.data(), lse.data(), logits.data(), S, E);
    return z_scale * dot(lse, lse) / tokens;
  };
  loss();
  V dl(S * E, 0.0);
  ops::router_zloss_backward(dl.data(), probs.data(), lse.data(), S, E, z_scale, tokens);
  expect_gradient(logits, dl, loss, "dlogits");
}

TEST(GradCheck, GroupedSwiGLUExperts) {
  const int E = 3, D = 4, F = 5;
  const std::vector<int64_t> offset = {0, 2, 2, 5};
  const int rows = 5;
  V x = random_vector(rows * D, 74), g = random_vector(rows * D, 75);
  V w1 = random_vector(E * D * F, 76), w3 = random_vector(E * D * F, 77);
  V w2 = random_vector(E * F * D, 78), out(rows * D), h1(rows * F), h3(h1), act(h1);
  auto loss = [&] {
    ops::experts_swiglu_forward(out.data(), h1.data(), h3.data(), act.data(), x.data(),
                                offset.data(), E, w1.data(), w3.data(), w2.data(), D, F);
    return dot(out, g);
  };
  loss();
  V dx(x.size()), dw1(w1.size(), 0.0), dw3(dw1), dw2(dw1), scratch(2 * rows * F);
  ops::experts_swiglu_backward(dx.data(), dw1.data(), dw3.data(), dw2.data(), scratch.data(),
                               g.data(), x.data(), h1.data(), h3.data(), act.data(), offset.data(),
                               E, w1.data(), w3.data(), w2.data(), D, F);
  expect_gradient(x, dx, loss, "dx");
  expect_gradient(w1, dw1, loss, "dw1");
  expect_gradient(w3, dw3, loss, "dw3");
  expect_gradient(w2, dw2, loss, "dw2");
}

TEST(GradCheck, RowVectorBroadcastAndRowSum) {
  const int S = 4, D = 3;
  V x0 = random_vector(S * D, 79), v = random_vector(D, 80), g = random_vector(S * D, 81), x;
  auto loss = [&] {
    x = x0;
    ops::add_row_vector(x.data(), v.data(), S, D);
    return dot(x, g);
  };
  V dv(D, 0.0);
  ops::sum_rows(dv.data(), g.data(), S, D);  // the broadcast's backward
  expect_gradient(v, dv, loss, "dv");
  V a = random_vector(7, 82), b = random_vector(7, 83), c = a;
  ops::add_inplace(c.data(), b.data(), c.size());
  for (size_t i = 0; i < c.size(); ++i) EXPECT_EQ(c[i], a[i] + b[i]);
}

TEST(Buffer, HostStorageBehavesLikeAVector) {
  Buffer<float> b(5);
  EXPECT_EQ(b.device(), Device::kCpu);
  EXPECT_EQ(b.size(), 5u);
  for (size_t i = 0; i < b.size(); ++i) EXPECT_EQ(b[i], 0.f);
  b[2] = 3.f;
  b.resize(8);  // contents kept, new elements zero
  EXPECT_EQ(b[2], 3.f);
  EXPECT_EQ(b[7], 0.f);
  Buffer<float> c = b;  // deep copy
  c[2] = 4.f;
  EXPECT_EQ(b[2], 3.f);
  const std::vector<float> host = copy_to_host(c);
  EXPECT_EQ(host.size(), 8u);
  EXPECT_EQ(host[2], 4.f);
  float two[2];
  copy_to_host(two, c, 2, 2);
  EXPECT_EQ(two[0], 4.f);
  EXPECT_THROW(copy_to_host(two, c, 7, 2), std::out_of_range);
  const int32_t src[3] = {1, 2, 3};
  Buffer<int32_t> t;
  copy_from_host(t, src, 3);
  EXPECT_EQ(t.host_vector(), (std::vector<int32_t>{1, 2, 3}));
  t.set_zero();
  EXPECT_EQ(t[1], 0);
  Buffer<float> moved(std::move(c));
  EXPECT_EQ(moved.size(), 8u);
  EXPECT_EQ(moved[2], 4.f);
  Buffer<double> filled(4, 1.5);
  EXPECT_EQ(filled[3], 1.5);
  t.clear();
  EXPECT_TRUE(t.empty());
}

TEST(Buffer, DeviceStorageNeedsACudaBuild) {
  EXPECT_FALSE(detail::device_available());
  try {
    Buffer<float> d(4, Device::kCuda);
    FAIL() << "a CPU build constructed a device buffer";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("no CUDA backend"), std::string::npos) << e.what();
  }
  EXPECT_THROW(set_default_device(Device::kCuda), std::runtime_error);
  EXPECT_EQ(default_device(), Device::kCpu);
  EXPECT_STREQ(to_string(Device::kCuda), "cuda");
}

}  // namespace
}  // namespace loopmoe

// IterAdaLN as a whole (norm block + modulation + gate source), every mode, double precision.
#include "model/iter_adaln.h"
#include "model/param_layout.h"

namespace loopmoe {
namespace {

class IterAdaLNGradTest : public ::testing::TestWithParam<IterAdaLNMode> {};

// One small layer: d = 6, d_c = 4.
ModelConfig norm_test_config(IterAdaLNMode mode) {
  ModelConfig c;
  c.d_model = 6;
  c.cond_dim = 4;
  c.n_layers = 1;
  c.n_experts = 2;
  c.top_k = 1;
  c.expert_hidden = 3;
  c.n_heads = 1;
  c.head_dim = 2;
  c.vocab_size = 5;
  c.iter_adaln = mode;
  return c;
}

TEST_P(IterAdaLNGradTest, ParametersAndInput) {
  const ModelConfig c = norm_test_config(GetParam());
  ParamLayout layout(c);
  const NormBlockOffsets& o = layout.layers[0].attn_norm;
  NormBlockT<double> block(c, o);
  const int S = 3, D = c.d_model, r = 2;
  V params = random_vector(layout.size(), 30, 0.5), x = random_vector(S * D, 31);
  V gu = random_vector(S * D, 32), gg = random_vector(S * D, 33);
  NormActivationsT<double> acts;
  // loss = <gu, u> + <gg, gate>: the block's two outputs.
  auto loss = [&] {
    block.forward(acts, params.data(), x.data(), r, S);
    double l = dot(copy_to_host(acts.u), gu);
    if (const double* m = block.gate_source(acts)) {
      for (int s = 0; s < S; ++s) {
        for (int i = 0; i < D; ++i) l += gg[s * D + i] * m[s * 3 * D + 2 * D + i];
      }
    }
    return l;
  };
  loss();
  V dx(S * D, 0.0), dparams(params.size(), 0.0), dm(S * 3 * D, 0.0);
  for (int s = 0; s < S; ++s) {
    for (int i = 0; i < D; ++i) dm[s * 3 * D + 2 * D + i] = gg[s * D + i];
  }
  block.backward(dx.data(), dparams.data(), gu.data(), dm.data(), acts, params.data(), x.data(), S);
  expect_gradient(x, dx, loss, "dx");
  // Only the attn_norm block's own tensors are used by this loss.
  for (const ParamTensor& t : layout.tensors()) {
    if (t.name.find("attn_norm") == std::string::npos) continue;
    V p(params.begin() + t.offset, params.begin() + t.offset + t.numel());
    V g(dparams.begin() + t.offset, dparams.begin() + t.offset + t.numel());
    auto sub_loss = [&] {
      std::copy(p.begin(), p.end(), params.begin() + t.offset);
      return loss();
    };
    expect_gradient(p, g, sub_loss, t.name);
    std::copy(p.begin(), p.end(), params.begin() + t.offset);
  }
}

// The grouped path (one group per row, summed by the tree) gives the same gradients.
TEST_P(IterAdaLNGradTest, GroupedGradientsEqualUngrouped) {
  const ModelConfig c = norm_test_config(GetParam());
  ParamLayout layout(c);
  NormBlockT<double> block(c, layout.layers[0].attn_norm);
  const int S = 3, D = c.d_model;
  V params = random_vector(layout.size(), 30, 0.5), x = random_vector(S * D, 31);
  V gu = random_vector(S * D, 32), gm = random_vector(S * 3 * D, 33);
  NormActivationsT<double> acts;
  block.forward(acts, params.data(), x.data(), 1, S);
  V dx(S * D, 0.0), dp(layout.size(), 0.0), dm = gm;
  block.backward(dx.data(), dp.data(), gu.data(), dm.data(), acts, params.data(), x.data(), S);
  V dx2(S * D, 0.0), groups(3 * layout.size(), 0.0), dm2 = gm;
  block.backward(dx2.data(), ops::GradGroups<double>{groups.data(), layout.size(), 3, S, 1},
                 gu.data(), dm2.data(), acts, params.data(), x.data());
  ops::tree_sum_groups(groups.data(), layout.size(), 3, {{0, layout.size()}});
  EXPECT_EQ(dx, dx2);
  for (size_t i = 0; i < layout.size(); ++i) EXPECT_NEAR(groups[i], dp[i], 1e-12) << i;
}

INSTANTIATE_TEST_SUITE_P(AllModes, IterAdaLNGradTest,
                         ::testing::Values(IterAdaLNMode::kOff, IterAdaLNMode::kJoint,
                                           IterAdaLNMode::kIter, IterAdaLNMode::kToken),
                         [](const auto& info) { return std::string(to_string(info.param)); });

}  // namespace
}  // namespace loopmoe
