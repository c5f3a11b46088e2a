// The device seam's float kernels (issue 12) held bit for bit to copies of the model-level loops
// they replaced.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

#include "model/ops.h"
#include "tests/ops_test_util.h"

namespace loopmoe {
namespace {

using testing::kept_of;
using testing::random_floats;
using testing::random_probs;
using testing::random_row_of_slot;
using testing::same_bits;

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
  model::ops::softmax_backward(dlogits.data(), dprobs.data(), probs.data(), S, E);
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

void router_stats(std::vector<int64_t>& assigned, std::vector<model::ops::LossSum>& prob_sum,
                  model::ops::LossSum& lse_sq_sum, const std::vector<int32_t>& expert,
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
           const std::vector<uint8_t>& decay_, const model::ops::AdamWStep& s,
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
    model::ops::moe_combine_forward(y_new.data(), out.data(), w.data(), kept.data(), S, k, D);
    EXPECT_TRUE(same_bits(y_old, y_new)) << "forward D=" << D;
    std::vector<float> d_old, dw_old, d_new(out.size(), 9.f), dw_new(w.size(), 9.f);
    legacy::combine_backward(d_old, dw_old, dy.data(), out, w, kept, S, k, D);
    model::ops::moe_combine_backward(d_new.data(), dw_new.data(), dy.data(), out.data(), w.data(),
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
      model::ops::router_topk_forward(ex_new.data(), w_new.data(), probs.data(), S, E, k, renorm);
      EXPECT_EQ(ex_old, ex_new);
      EXPECT_TRUE(same_bits(w_old, w_new)) << "weights k=" << k << " renorm=" << renorm;

      std::vector<int64_t> as_old(E, 0), as_new(E, 0);
      std::vector<model::ops::LossSum> ps_old(E), ps_new(E);
      model::ops::LossSum lq_old, lq_new;
      legacy::router_stats(as_old, ps_old, lq_old, ex_old, probs, lse, S, E);
      model::ops::router_stats(as_new.data(), ps_new.data(), &lq_new, ex_new.data(), probs.data(),
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
      model::ops::router_topk_backward(dprobs.data(), dweight.data(), probs.data(), ex_new.data(),
                                       w_new.data(), bias.data(), S, E, k, renorm);
      model::ops::softmax_backward(dl_new.data(), dprobs.data(), probs.data(), S, E);
      model::ops::router_zloss_backward(dl_new.data(), probs.data(), lse.data(), S, E, z_scale,
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
      model::ops::moe_permute_forward(b.data(), src, ros.data(), ros.size(), k, D);
    } else {
      model::ops::moe_unpermute_backward(b.data(), src, ros.data(), ros.size(), D);
    }
    EXPECT_TRUE(same_bits(a, b)) << "permute per_row=" << per_row;
  }
  std::vector<float> a(ros.size() * D, 9.f), b(ros.size() * D, 7.f);
  legacy::scatter_slot_rows(a.data(), expert_rows.data(), ros, D);
  model::ops::moe_unpermute_forward(b.data(), expert_rows.data(), ros.data(), ros.size(), D);
  EXPECT_TRUE(same_bits(a, b)) << "unpermute";
  std::vector<float> dx_old = x, dx_new = x;
  legacy::add_slot_rows_to_tokens(dx_old.data(), expert_rows.data(), ros, S, k, D);
  model::ops::moe_permute_backward(dx_new.data(), expert_rows.data(), ros.data(), S, k, D);
  EXPECT_TRUE(same_bits(dx_old, dx_new)) << "permute backward";
  // The index permutations of the expert shards: gather then scatter is the identity.
  std::vector<int64_t> index(rows);
  for (int64_t r = 0; r < rows; ++r) index[r] = r;
  std::shuffle(index.begin(), index.end(), std::mt19937_64(8));
  std::vector<float> g(expert_rows.size()), back(expert_rows.size());
  model::ops::gather_rows(g.data(), expert_rows.data(), index.data(), rows, D);
  for (int64_t r = 0; r < rows; ++r) {
    EXPECT_EQ(0, std::memcmp(&g[r * D], &expert_rows[index[r] * D], D * sizeof(float)));
  }
  model::ops::scatter_rows(back.data(), g.data(), index.data(), rows, D);
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
  model::ops::experts_swiglu_forward(out.data(), h1.data(), h3.data(), act.data(), x.data(),
                                     offset.data(), E, rows, w1.data(), w3.data(), w2.data(), D, F);
  model::ops::experts_swiglu_backward(dx.data(), dw1.data(), dw3.data(), dw2.data(), scratch.data(),
                                      dout.data(), x.data(), h1.data(), h3.data(), act.data(),
                                      offset.data(), E, rows, w1.data(), w3.data(), w2.data(), D,
                                      F);
  // The old experts.cc called swiglu_forward/backward once per expert on its rows.
  std::vector<float> o2(x.size()), a1(RF), a3(RF), aa(RF), dx2(x.size());
  std::vector<float> e1(w1.size(), 0.f), e3(e1), e2(e1), sc(2 * RF);
  for (int e = 0; e < E; ++e) {
    const int64_t r0 = offset[e];
    const int n = static_cast<int>(offset[e + 1] - r0);
    const size_t wf = static_cast<size_t>(e) * D * F;
    model::ops::swiglu_forward(o2.data() + r0 * D, a1.data() + r0 * F, a3.data() + r0 * F,
                               aa.data() + r0 * F, x.data() + r0 * D, w1.data() + wf,
                               w3.data() + wf, w2.data() + wf, n, D, F);
    model::ops::swiglu_backward(dx2.data() + r0 * D, e1.data() + wf, e3.data() + wf, e2.data() + wf,
                                sc.data() + 2 * r0 * F, dout.data() + r0 * D, x.data() + r0 * D,
                                a1.data() + r0 * F, a3.data() + r0 * F, aa.data() + r0 * F,
                                w1.data() + wf, w3.data() + wf, w2.data() + wf, n, D, F);
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
  EXPECT_EQ(legacy_strict::global_norm(g0.data(), n),
            std::sqrt(model::ops::sum_squares(g0.data(), n)));
  EXPECT_EQ(legacy_strict::global_norm(g0.data(), 1000),
            std::sqrt(model::ops::sum_squares(g0.data(), 1000)));
  std::vector<float> a = g0, b = g0;
  legacy_strict::clip_scale(a.data(), n, 0.37f);
  model::ops::scale_inplace(b.data(), n, 0.37f);
  EXPECT_TRUE(same_bits(a, b));
  std::vector<uint8_t> decay(n);
  for (size_t i = 0; i < n; ++i) decay[i] = (i / 1000) % 2;
  const std::vector<std::pair<size_t, size_t>> ranges = {{0, 5000}, {7000, n - 7000}};
  std::vector<float> p_old = random_floats(n, 41), p_new = p_old;
  std::vector<float> m_old(n, 0.f), v_old(n, 0.f), m_new(n, 0.f), v_new(n, 0.f);
  for (int t = 1; t <= 3; ++t) {
    const std::vector<float> g = random_floats(n, 42 + t, 0.1);
    const model::ops::AdamWStep st{0.9f,
                                   0.95f,
                                   static_cast<float>(1.0 / (1.0 - std::pow(0.9, t))),
                                   static_cast<float>(1.0 / (1.0 - std::pow(0.95, t))),
                                   3e-3f,
                                   1e-8f,
                                   0.1f};
    legacy_strict::adamw(p_old.data(), g.data(), m_old, v_old, decay, st, ranges);
    for (const auto& [offset, len] : ranges) {
      model::ops::adamw_update(p_new.data() + offset, m_new.data() + offset, v_new.data() + offset,
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
    model::ops::halt_converged_rows(halted_at.data(), frozen_new.data(), prev.data(), cur.data(), S,
                                    D, 0.2, r + 1);
    // The frozen rows go back into the stream (hold_halted).
    std::vector<float> held = cur;
    model::ops::copy_masked_rows(held.data(), frozen_new.data(), halted_at.data(), S, D);
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

}  // namespace
}  // namespace loopmoe
