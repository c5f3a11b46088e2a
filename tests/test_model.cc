// Model-level behaviour: layout, IterAdaLN identity at init, determinism, routing and the
// dispatcher held equal to a naive per-token reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/dispatcher.h"
#include "model/local_dispatcher.h"
#include "model/model.h"
#include "model/moe_layer.h"
#include "model/ops.h"
#include "model/optimizer.h"
#include "model/rng.h"

namespace loopmoe {
namespace {

model::ModelConfig small(model::IterAdaLNMode mode, int layers = 2, int loops = 2) {
  model::ModelConfig c;
  c.vocab_size = 64;
  c.seq_len = 8;
  c.d_model = 16;
  c.n_heads = 2;
  c.head_dim = 8;
  c.n_layers = layers;
  c.n_loops = loops;
  c.n_experts = 4;
  c.top_k = 2;
  c.expert_hidden = 12;
  c.iter_adaln = mode;
  c.cond_dim = 6;
  return c;
}

std::vector<int32_t> random_tokens(int n, int vocab, uint64_t seed) {
  model::Rng rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng.next_u64() % vocab);
  return t;
}

TEST(ParamLayout, CountsMatchAnIndependentFormula) {
  for (auto mode : {model::IterAdaLNMode::kOff, model::IterAdaLNMode::kJoint,
                    model::IterAdaLNMode::kIter, model::IterAdaLNMode::kToken}) {
    model::ModelConfig c = small(mode);
    c.tie_embeddings = mode != model::IterAdaLNMode::kIter;
    const size_t d = c.d_model, I = c.attn_inner(), E = c.n_experts, f = c.expert_hidden;
    const size_t dc = c.cond_dim, V = c.vocab_size;
    size_t norm = d;
    if (mode != model::IterAdaLNMode::kOff) {
      norm = dc * 3 * d + 3 * d;
      if (c.adaln_iter_term()) norm += 2 * dc * dc + 2 * dc;
      if (c.adaln_token_term()) norm += d * dc;
    }
    const size_t layer = 2 * norm + d * 3 * I + I * d + d * E + 3 * E * d * f;
    const size_t expect = V * d + c.n_layers * layer + d + (c.tie_embeddings ? 0 : d * V);
    model::ParamLayout layout(c);
    EXPECT_EQ(layout.size(), expect) << to_string(mode);
    size_t sum = 0;
    for (const auto& t : layout.tensors()) {
      EXPECT_EQ(t.offset, sum) << t.name;
      sum += t.numel();
    }
    EXPECT_EQ(sum, layout.size());
  }
}

// With mod_w = mod_b = 0 every IterAdaLN mode is plain normalisation with an open gate, so from
// the same shared weights all modes compute the same loss (DESIGN.md §1).
TEST(IterAdaLN, AllModesStartAsTheSameFunction) {
  const int B = 2, T = 8;
  auto tokens = random_tokens(B * T, 64, 1), targets = random_tokens(B * T, 64, 2);
  model::Model reference(small(model::IterAdaLNMode::kOff));
  reference.init_params(3);
  const double want = reference.forward(tokens.data(), targets.data(), B, T).total;
  for (auto mode :
       {model::IterAdaLNMode::kJoint, model::IterAdaLNMode::kIter, model::IterAdaLNMode::kToken}) {
    model::Model m(small(mode));
    m.init_params(4);
    for (const auto& t : reference.layout().tensors()) {
      if (t.name.find("norm") != std::string::npos) continue;
      const auto& dst = m.layout().find(t.name);
      std::memcpy(m.params() + dst.offset, reference.params() + t.offset, t.numel() * 4);
    }
    EXPECT_NEAR(m.forward(tokens.data(), targets.data(), B, T).total, want, 1e-6)
        << to_string(mode);
  }
}

TEST(Model, SameSeedGivesBitIdenticalTraining) {
  auto run = [] {
    const auto in = random_tokens(16, 64, 100), tg = random_tokens(16, 64, 200);
    model::Model m(small(model::IterAdaLNMode::kJoint));
    m.init_params(11);
    model::TrainConfig tc;
    tc.steps = 5;
    tc.warmup_steps = 1;
    model::AdamW opt(m.layout(), tc);
    std::vector<double> losses;
    for (int s = 0; s < 5; ++s) {
      m.zero_grad();
      losses.push_back(m.forward(in.data(), tg.data(), 2, 8).total);
      m.backward();
      model::clip_grad_norm(m.grads(), m.num_params(), 1.0);
      opt.step(m.params(), m.grads(), model::learning_rate(tc, s));
    }
    return losses;
  };
  auto a = run(), b = run();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], b[i]) << i;
  EXPECT_LT(a.back(), a.front());  // and it learns the fixed batch
}

TEST(Model, TwoThreadsGiveTheSameLossAsOne) {
  auto loss_with = [](int threads) {
    model::set_num_threads(threads);
    model::Model m(small(model::IterAdaLNMode::kJoint));
    m.init_params(17);
    auto in = random_tokens(16, 64, 1), tg = random_tokens(16, 64, 2);
    double l = m.forward(in.data(), tg.data(), 2, 8).total;
    m.backward();
    model::set_num_threads(1);
    return std::pair{l, model::global_norm(m.grads(), m.num_params())};
  };
  auto one = loss_with(1), two = loss_with(2);
  // Every reduction runs in a fixed order, so the thread count does not change the numbers.
  EXPECT_EQ(one.first, two.first);
  EXPECT_EQ(one.second, two.second);
}

TEST(Model, LoopCountCanChangeAtRunTime) {
  model::Model m(small(model::IterAdaLNMode::kJoint, 2, 3));
  m.init_params(5);
  auto in = random_tokens(16, 64, 1), tg = random_tokens(16, 64, 2);
  m.forward(in.data(), tg.data(), 2, 8, 1);
  EXPECT_EQ(m.applications(), 2);
  m.zero_grad();
  const double l5 = m.forward(in.data(), tg.data(), 2, 8, 5).total;
  EXPECT_EQ(m.applications(), 10);
  m.backward();
  EXPECT_TRUE(std::isfinite(l5));
  EXPECT_GT(model::global_norm(m.grads(), m.num_params()), 0);
}

TEST(Model, LogitLensAndAdaptiveHalting) {
  model::Model m(small(model::IterAdaLNMode::kJoint, 2, 3));
  m.init_params(6);
  auto in = random_tokens(16, 64, 3), tg = random_tokens(16, 64, 4);
  const model::LossParts full = m.forward(in.data(), tg.data(), 2, 8);
  // Decoding the last iteration's state is the model's own cross-entropy.
  EXPECT_NEAR(m.decode_loss(m.iteration_state(2), tg.data(), 16), full.ce, 1e-6);
  const double after_first = m.decode_loss(m.iteration_state(0), tg.data(), 16);
  // A threshold no change can beat halts every token after its first iteration, which is
  // exactly the one-iteration model.
  model::ForwardOptions halt_all;
  halt_all.halt_threshold = 1e9;
  const model::LossParts halted = m.forward(in.data(), tg.data(), 2, 8, halt_all);
  for (int used : m.iterations_used()) EXPECT_EQ(used, 1);
  EXPECT_THROW(m.backward(), std::logic_error);
  const model::LossParts one = m.forward(in.data(), tg.data(), 2, 8, 1);
  EXPECT_EQ(halted.ce, one.ce);
  EXPECT_NEAR(after_first, one.ce, 1e-6);
  model::ForwardOptions never;
  never.halt_threshold = 1e-30;
  EXPECT_EQ(m.forward(in.data(), tg.data(), 2, 8, never).ce, full.ce);
  for (int used : m.iterations_used()) EXPECT_EQ(used, 3);
}

// The logits leave the activation buffer through an explicit host copy; on the CPU the host view
// logits() is that buffer itself and holds the same numbers.
TEST(Model, LogitsToHostEqualsTheHostView) {
  model::ModelConfig c = small(model::IterAdaLNMode::kJoint);
  model::Model m(c);
  m.init_params(7);
  auto in = random_tokens(16, 64, 5);
  m.forward(in.data(), nullptr, 2, 8);
  const std::vector<float> host = m.logits_to_host();
  ASSERT_EQ(host.size(), static_cast<size_t>(16) * c.vocab_size);
  EXPECT_EQ(host, m.logits());
}

// The LM head's cross-entropy in place (the default: the softmax over the logits) gives the
// loss and gradients of the head with a softmax buffer of its own (set_keep_logits) bit for bit;
// the logits are then gone, and asking for them is an error, not the softmax's numbers.
TEST(Model, HeadInPlaceEqualsTheKeptLogitsBitForBit) {
  model::ModelConfig c = small(model::IterAdaLNMode::kJoint);
  model::Model in_place(c), kept(c);
  in_place.init_params(7);
  kept.init_params(7);
  kept.set_keep_logits(true);
  const auto in = random_tokens(16, 64, 5), tg = random_tokens(16, 64, 6);
  in_place.zero_grad();
  kept.zero_grad();
  const model::LossParts a = in_place.forward(in.data(), tg.data(), 2, 8);
  const model::LossParts b = kept.forward(in.data(), tg.data(), 2, 8);
  EXPECT_EQ(a.ce, b.ce);
  EXPECT_EQ(a.total, b.total);
  EXPECT_THROW(in_place.logits_to_host(), std::logic_error);
  EXPECT_THROW(in_place.logits(), std::logic_error);
  const std::vector<float> logits = kept.logits_to_host();
  in_place.backward();
  kept.backward();
  EXPECT_EQ(in_place.grads_to_host(), kept.grads_to_host());
  EXPECT_EQ(kept.logits_to_host(), logits);  // the backward did not touch them either
  // A forward without targets leaves the logits, in place or not, and has no backward.
  in_place.forward(in.data(), nullptr, 2, 8);
  EXPECT_THROW(in_place.backward(), std::logic_error);
  kept.forward(in.data(), nullptr, 2, 8);
  EXPECT_EQ(in_place.logits_to_host(), logits);
  EXPECT_EQ(kept.logits_to_host(), logits);
}

// ops.h moe_rows_by_expert (the local dispatcher's layout, computed where the activations live)
// is group_rows_by_expert's layout of a plan: dropless, with the capacity walk's drops (with and
// without slots of the batch before this process's, the distributed service's `preceding`), and
// with drops anywhere (a plan built by hand).
TEST(Dispatch, RowsByExpertIsTheLayoutOfThePlan) {
  const int E = 6, k = 2, S = 300;
  model::Rng rng(9);
  for (int64_t capacity : {int64_t{0}, int64_t{70}, int64_t{40}, int64_t{-1}}) {
    SCOPED_TRACE(testing::Message() << "capacity " << capacity);
    model::RoutingPlan plan;
    plan.num_tokens = S;
    plan.num_experts = E;
    plan.top_k = k;
    plan.expert.resize(static_cast<size_t>(S) * k);
    for (int32_t& e : plan.expert) e = static_cast<int32_t>(rng.next_u64() % (E - 1));  // E-1: none
    const std::vector<int64_t> preceding = {0, 5, 0, 30, 0, 0};
    plan.kept.assign(plan.expert.size(), 1);
    plan.received.assign(E, 0);
    for (size_t i = 0; i < plan.expert.size(); ++i) {  // router.cc's walk
      const int e = plan.expert[i];
      const bool keep = capacity < 0 ? rng.next_u64() % 5 != 0
                                     : capacity == 0 || preceding[e] + plan.received[e] < capacity;
      if (keep) {
        ++plan.received[e];
      } else {
        plan.kept[i] = 0;
      }
    }
    std::vector<int64_t> offset, want;
    model::group_rows_by_expert(plan, offset, want);
    std::vector<int64_t> got(want.size(), -7), got_offset(E + 1, -7);
    model::ops::moe_rows_by_expert(got.data(), got_offset.data(), plan.expert.data(),
                                   plan.kept.data(), plan.received.data(), got.size(), E);
    EXPECT_EQ(got, want);
    EXPECT_EQ(got_offset, offset);
    if (capacity == 40 || capacity < 0) {
      EXPECT_GT(std::count(want.begin(), want.end(), -1), 0);
    }
  }
}

// ops.h moe_capacity_keep is the capacity walk in slot order (MODEL.md "Capacity"), written out
// here as the router did it on the host: a slot is kept while its expert's kept slots so far,
// the batch's earlier ones (`preceding`) included, are under the capacity.
TEST(Dispatch, CapacityKeepIsTheWalkInSlotOrder) {
  const int E = 5, k = 2, S = 257;
  model::Rng rng(21);
  std::vector<int32_t> expert(static_cast<size_t>(S) * k);
  for (int32_t& e : expert) e = static_cast<int32_t>(rng.next_u64() % (E - 1));  // E-1: none
  for (bool with_preceding : {false, true}) {
    const std::vector<int64_t> preceding =
        with_preceding ? std::vector<int64_t>{0, 7, 200, 30, 0} : std::vector<int64_t>(E, 0);
    for (int64_t capacity :
         {int64_t{-1}, int64_t{0}, int64_t{1}, int64_t{60}, int64_t{130}, int64_t{100000}}) {
      SCOPED_TRACE(testing::Message()
                   << "capacity " << capacity << " preceding " << with_preceding);
      std::vector<uint8_t> want(expert.size(), 1);
      std::vector<int64_t> want_received(E, 0);
      for (size_t i = 0; i < expert.size(); ++i) {
        const int e = expert[i];
        if (capacity < 0 || preceding[e] + want_received[e] < capacity) {
          ++want_received[e];
        } else {
          want[i] = 0;
        }
      }
      std::vector<uint8_t> got(expert.size(), 7);
      std::vector<int64_t> received(E, -7);
      model::ops::moe_capacity_keep(got.data(), received.data(), expert.data(),
                                    with_preceding ? preceding.data() : nullptr, capacity,
                                    expert.size(), E);
      EXPECT_EQ(got, want);
      EXPECT_EQ(received, want_received);
    }
  }
}

// The MoE layer through the LocalDispatcher equals a token-by-token evaluation of the experts.
TEST(MoeLayer, MatchesNaivePerTokenReference) {
  model::ModelConfig c = small(model::IterAdaLNMode::kOff);
  c.n_experts = 5;
  c.capacity_factor = 0.75;  // with drops
  model::ParamLayout layout(c);
  std::vector<float> params(layout.size()), grads(layout.size(), 0.f);
  model::Rng rng(9);
  for (float& p : params) p = static_cast<float>(0.3 * rng.normal());
  model::LocalDispatcher dispatcher(c, layout, params.data(), grads.data());
  model::MoeLayer moe(c);
  const int S = 24, D = c.d_model, F = c.expert_hidden;
  std::vector<float> u(S * D), y(S * D);
  for (float& x : u) x = static_cast<float>(rng.normal());
  model::MoeActivations acts;
  const model::LayerOffsets& l = layout.layers[0];
  moe.forward(acts, dispatcher, 0, 0, params.data() + l.router, u.data(), y.data(), S);
  // The local dispatcher works from the device copies: nothing of the plan is on the host yet.
  EXPECT_FALSE(acts.plan.summary_on_host);
  EXPECT_FALSE(acts.plan.slots_on_host);
  EXPECT_TRUE(acts.plan.expert.empty());
  model::routing_to_host(acts.plan, acts.router, /*slots=*/true);
  EXPECT_GT(acts.plan.dropped, 0);
  std::vector<float> h1(F), h3(F), act(F), out(D);
  for (int t = 0; t < S; ++t) {
    std::vector<double> want(D, 0.0);
    for (int j = 0; j < c.top_k; ++j) {
      const size_t slot = t * c.top_k + j;
      if (!acts.plan.kept[slot]) continue;
      const int e = acts.plan.expert[slot];
      const size_t wf = static_cast<size_t>(e) * D * F;
      model::ops::swiglu_forward(out.data(), h1.data(), h3.data(), act.data(), u.data() + t * D,
                                 params.data() + l.w1 + wf, params.data() + l.w3 + wf,
                                 params.data() + l.w2 + wf, 1, D, F);
      for (int i = 0; i < D; ++i) want[i] += acts.plan.weight[slot] * out[i];
    }
    for (int i = 0; i < D; ++i) EXPECT_NEAR(y[t * D + i], want[i], 1e-5) << t << "," << i;
  }
}

TEST(Router, CapacityDropsAreCountedWhenEveryTokenPicksTheSameExperts) {
  const int S = 32, D = 4, E = 8, k = 2;
  std::vector<float> u(S * D, 1.f), w(D * E, 0.f);
  for (int i = 0; i < D; ++i) {
    w[i * E + 0] = 5.f;  // expert 0 first, expert 1 second, for every token
    w[i * E + 1] = 4.f;
  }
  model::RoutingPlan plan;
  model::RouterActivations acts;
  model::router_forward(plan, acts, u.data(), w.data(), S, D, {E, k, true, 1.0});
  const int capacity = S * k / E;  // ceil(1.0 * 32 * 2 / 8) = 8
  EXPECT_EQ(plan.assigned[0], S);
  EXPECT_EQ(plan.assigned[1], S);
  EXPECT_EQ(plan.received[0], capacity);
  EXPECT_EQ(plan.received[1], capacity);
  EXPECT_EQ(plan.dropped, 2 * (S - capacity));
  // The first `capacity` tokens keep both slots, later tokens lose both.
  EXPECT_TRUE(plan.kept[0] && plan.kept[1]);
  EXPECT_FALSE(plan.kept[2 * capacity] || plan.kept[2 * capacity + 1]);
  // Maximal imbalance: aux = E * (1/2 * p0 + 1/2 * p1) with p0 + p1 close to 1.
  EXPECT_GT(plan.aux_loss, 0.9 * E / 2);
  model::router_forward(plan, acts, u.data(), w.data(), S, D, {E, k, true, 0.0});
  EXPECT_EQ(plan.dropped, 0);
}

// Router losses and combine-weight gradients against central differences, with the top-k
// selection held fixed (the checked perturbations must not change it). Float: loose tolerance;
// the float64 PyTorch oracle holds the router to 1e-4 in tests/reference.
TEST(GradCheck, RouterWithTopKHeldFixed) {
  for (bool renorm : {true, false}) {
    const int S = 6, D = 5, E = 4, k = 2;
    model::Rng rng(21);
    std::vector<float> u(S * D), w(D * E), dweight(S * k);
    for (float& x : u) x = static_cast<float>(rng.normal());
    for (float& x : w) x = static_cast<float>(rng.normal());
    for (float& x : dweight) x = static_cast<float>(rng.normal());
    const model::RouterOptions opt{E, k, renorm, 0.0};
    const double aux_c = 0.3, z_c = 0.2;
    model::RoutingPlan base;
    model::RouterActivations acts;
    model::router_forward(base, acts, u.data(), w.data(), S, D, opt);
    auto loss = [&](model::RoutingPlan& p) {
      model::router_forward(p, acts, u.data(), w.data(), S, D, opt);
      double l = aux_c * p.aux_loss + z_c * p.z_loss;
      for (int i = 0; i < S * k; ++i) l += static_cast<double>(dweight[i]) * p.weight[i];
      return l;
    };
    std::vector<float> du(S * D, 0.f), dw(D * E, 0.f);
    model::router_forward(base, acts, u.data(), w.data(), S, D, opt);
    model::router_backward(du.data(), dw.data(), dweight.data(), base, acts, u.data(), w.data(), S,
                           D, opt, aux_c, z_c);
    for (auto [x, g, name] : {std::tuple{&u, &du, "du"}, std::tuple{&w, &dw, "drouter"}}) {
      for (size_t i = 0; i < x->size(); ++i) {
        const float saved = (*x)[i], h = 1e-2f;
        model::RoutingPlan p;
        (*x)[i] = saved + h;
        const double lp = loss(p);
        ASSERT_EQ(p.expert, base.expert) << "perturbation changed the top-k selection";
        (*x)[i] = saved - h;
        const double lm = loss(p);
        ASSERT_EQ(p.expert, base.expert);
        (*x)[i] = saved;
        const double num = (lp - lm) / (2 * h);
        EXPECT_NEAR((*g)[i], num, 2e-3 + 2e-2 * std::abs(num)) << name << "[" << i << "]";
      }
    }
  }
}

// The op profile (model/ops.h set_op_profiling, loopmoe_bench --profile): off, it records
// nothing; on, every dispatched ops.h call of a training step is counted under its name.
TEST(OpProfile, CountsEveryDispatchedCallWhileOn) {
  const int B = 2, T = 8;
  model::Model m(small(model::IterAdaLNMode::kJoint, 2, 3));
  m.init_params(1);
  const auto tokens = random_tokens(B * T, 64, 5), targets = random_tokens(B * T, 64, 6);
  const auto step = [&] {
    m.zero_grad();
    m.forward(tokens.data(), targets.data(), B, T);
    m.backward();
  };
  model::ops::reset_op_profile();
  ASSERT_FALSE(model::ops::op_profiling());
  step();
  EXPECT_TRUE(model::ops::op_profile().empty()) << "recorded while off";

  model::ops::set_op_profiling(true);
  step();
  step();
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
