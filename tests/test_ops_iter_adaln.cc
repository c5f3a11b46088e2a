// IterAdaLN as a whole (norm block + modulation + gate source), every mode, double precision.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "model/buffer.h"
#include "model/iter_adaln.h"
#include "model/ops.h"
#include "model/param_layout.h"
#include "tests/grad_check.h"

namespace loopmoe {
namespace {

using testing::dot;
using testing::expect_gradient;
using testing::random_vector;
using V = std::vector<double>;

class IterAdaLNGradTest : public ::testing::TestWithParam<model::IterAdaLNMode> {};

// One small layer: d = 6, d_c = 4.
model::ModelConfig norm_test_config(model::IterAdaLNMode mode) {
  model::ModelConfig c;
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
  const model::ModelConfig c = norm_test_config(GetParam());
  model::ParamLayout layout(c);
  const model::NormBlockOffsets& o = layout.layers[0].attn_norm;
  model::NormBlockT<double> block(c, o);
  const int S = 3, D = c.d_model, r = 2;
  V params = random_vector(layout.size(), 30, 0.5), x = random_vector(S * D, 31);
  V gu = random_vector(S * D, 32), gg = random_vector(S * D, 33);
  model::NormActivationsT<double> acts;
  // loss = <gu, u> + <gg, gate>: the block's two outputs.
  auto loss = [&] {
    block.forward(acts, params.data(), x.data(), r, S);
    double l = dot(model::copy_to_host(acts.u), gu);
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
  for (const model::ParamTensor& t : layout.tensors()) {
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
  const model::ModelConfig c = norm_test_config(GetParam());
  model::ParamLayout layout(c);
  model::NormBlockT<double> block(c, layout.layers[0].attn_norm);
  const int S = 3, D = c.d_model;
  V params = random_vector(layout.size(), 30, 0.5), x = random_vector(S * D, 31);
  V gu = random_vector(S * D, 32), gm = random_vector(S * 3 * D, 33);
  model::NormActivationsT<double> acts;
  block.forward(acts, params.data(), x.data(), 1, S);
  V dx(S * D, 0.0), dp(layout.size(), 0.0), dm = gm;
  block.backward(dx.data(), dp.data(), gu.data(), dm.data(), acts, params.data(), x.data(), S);
  V dx2(S * D, 0.0), groups(3 * layout.size(), 0.0), dm2 = gm;
  block.backward(dx2.data(), model::ops::GradGroups<double>{groups.data(), layout.size(), 3, S, 1},
                 gu.data(), dm2.data(), acts, params.data(), x.data());
  model::ops::tree_sum_groups(groups.data(), layout.size(), 3, {{0, layout.size()}});
  EXPECT_EQ(dx, dx2);
  for (size_t i = 0; i < layout.size(); ++i) EXPECT_NEAR(groups[i], dp[i], 1e-12) << i;
}

INSTANTIATE_TEST_SUITE_P(AllModes, IterAdaLNGradTest,
                         ::testing::Values(model::IterAdaLNMode::kOff, model::IterAdaLNMode::kJoint,
                                           model::IterAdaLNMode::kIter,
                                           model::IterAdaLNMode::kToken),
                         [](const auto& info) { return std::string(to_string(info.param)); });

}  // namespace
}  // namespace loopmoe
