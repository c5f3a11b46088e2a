// The op profile (model/ops.h set_op_profiling, loopmoe_bench --profile): off, it records
// nothing; on, every dispatched ops.h call of a training step is counted under its name.
#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "model/model.h"
#include "model/ops.h"
#include "model/rng.h"

namespace loopmoe {
namespace {

model::ModelConfig tiny() {
  model::ModelConfig c;
  c.vocab_size = 64;
  c.seq_len = 8;
  c.d_model = 16;
  c.n_heads = 2;
  c.head_dim = 8;
  c.n_layers = 2;
  c.n_loops = 3;
  c.n_experts = 4;
  c.top_k = 2;
  c.expert_hidden = 12;
  c.iter_adaln = model::IterAdaLNMode::kJoint;
  c.cond_dim = 6;
  return c;
}

void step(model::Model& m) {
  const int B = 2, T = 8;
  model::Rng rng(5);
  std::vector<int32_t> tokens(B * T), targets(B * T);
  for (size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = static_cast<int32_t>(rng.next_u64() % 64);
    targets[i] = static_cast<int32_t>(rng.next_u64() % 64);
  }
  m.zero_grad();
  m.forward(tokens.data(), targets.data(), B, T);
  m.backward();
}

TEST(OpProfile, CountsEveryDispatchedCallWhileOn) {
  model::Model m(tiny());
  m.init_params(1);
  model::ops::reset_op_profile();
  ASSERT_FALSE(model::ops::op_profiling());
  step(m);
  EXPECT_TRUE(model::ops::op_profile().empty()) << "recorded while off";

  model::ops::set_op_profiling(true);
  step(m);
  step(m);
  model::ops::set_op_profiling(false);
  std::map<std::string, model::ops::OpTime> by_name;
  double seconds = 0;
  const std::vector<model::ops::OpTime> profile = model::ops::op_profile();
  for (size_t i = 0; i < profile.size(); ++i) {
    by_name[profile[i].name] = profile[i];
    seconds += profile[i].seconds;
    EXPECT_GE(profile[i].seconds, 0) << profile[i].name;
    if (i > 0) {
      EXPECT_GE(profile[i - 1].seconds, profile[i].seconds) << "not sorted";
    }
  }
  EXPECT_GT(seconds, 0);
  // 2 layers × 3 loops = 6 attention applications per step, one embedding per step.
  EXPECT_EQ(by_name["attention_forward"].calls, 2 * 6);
  EXPECT_EQ(by_name["attention_backward"].calls, 2 * 6);
  EXPECT_EQ(by_name["embedding_forward"].calls, 2);
  EXPECT_EQ(by_name["experts_swiglu_forward"].calls, 2 * 6);

  model::ops::reset_op_profile();
  EXPECT_TRUE(model::ops::op_profile().empty());
}

}  // namespace
}  // namespace loopmoe
