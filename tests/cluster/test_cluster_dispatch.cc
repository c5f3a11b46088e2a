// The dispatcher seam of the distributed runtime: the collective dispatcher gives the local
// dispatcher's numbers, a worker never commits pages for expert weights it does not hold, and the
// expert partition covers every expert once.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "cluster_fixture.h"
#include "comm/gloo_communicator.h"
#include "comm/in_process_store.h"
#include "expert_shard/shard_experts.h"
#include "model/local_dispatcher.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "model/param_layout.h"
#include "model/rng.h"
#include "runtime/collective_dispatcher.h"

namespace loopmoe::runtime {
namespace {

namespace fs = std::filesystem;

using testing::parallel;

// --- The dispatcher seam: collective == local ---------------------------------------------------

// Forward outputs, input gradients and expert weight gradients of one MoE application through the
// collective dispatcher (2 workers holding halves of the tokens, 2 shards) equal the local
// dispatcher's. `all_to_one`: every slot goes to expert 0, so shard 1 and most experts get nothing.
void check_dispatchers_agree(bool all_to_one) {
  model::ModelConfig mc;
  mc.d_model = 16;
  mc.expert_hidden = 8;
  mc.n_experts = 5;
  mc.top_k = 2;
  mc.n_layers = 1;
  mc.vocab_size = 32;
  mc.n_heads = 2;
  mc.head_dim = 8;
  const int S = 12, D = mc.d_model, k = mc.top_k, E = mc.n_experts, W = 2, Sh = 2;
  model::Model model(mc);
  model.init_params(7);
  model::Rng rng(3);
  std::vector<float> x(static_cast<size_t>(S) * D), dout(static_cast<size_t>(S) * k * D);
  for (float& v : x) v = static_cast<float>(rng.normal());
  for (float& v : dout) v = static_cast<float>(rng.normal());
  model::RoutingPlan plan;
  plan.num_tokens = S;
  plan.num_experts = E;
  plan.top_k = k;
  for (int t = 0; t < S; ++t) {
    for (int j = 0; j < k; ++j) {
      plan.expert.push_back(all_to_one ? 0 : (t * 3 + j * 2) % E);
      plan.weight.push_back(0.5f);
      plan.kept.push_back(all_to_one || (t + j) % 7 != 0);  // some dropped slots
    }
  }
  plan.received.assign(E, 0);
  for (size_t i = 0; i < plan.expert.size(); ++i) plan.received[plan.expert[i]] += plan.kept[i];

  // Local reference.
  std::vector<float> out_ref(dout.size()), dx_ref(x.size(), 0.f);
  model.zero_grad();
  model::LocalDispatcher local(mc, model.layout(), model.params(), model.grads());
  local.forward(0, 0, plan, x.data(), out_ref.data());
  local.backward(0, 0, plan, dout.data(), dx_ref.data());
  const model::LayerOffsets& l = model.layout().layers[0];
  const size_t DF = static_cast<size_t>(D) * mc.expert_hidden;

  // Collective: worker w holds tokens [w*S/2, (w+1)*S/2) and that part of the plan.
  std::vector<float> out(dout.size()), dx(x.size(), 0.f);
  std::vector<std::vector<float>> shard_grads(Sh);
  ExpertPartition part(E, Sh);
  comm::InProcessStore store;
  comm::NamespacedStore ns(store, all_to_one ? "disp1" : "disp0", 0);
  parallel(W + Sh, [&](int rank) {
    comm::GlooOptions o;
    o.timeout = std::chrono::seconds(20);
    auto world = comm::make_gloo_communicator(ns, rank, W + Sh, o);
    if (rank < W) {
      const int t0 = rank * S / W, t1 = (rank + 1) * S / W, n = t1 - t0;
      model::RoutingPlan mine = plan;
      mine.num_tokens = n;
      auto cut = [&](auto& v) {
        v.assign(v.begin() + static_cast<ptrdiff_t>(t0) * k,
                 v.begin() + static_cast<ptrdiff_t>(t1) * k);
      };
      cut(mine.expert);
      cut(mine.weight);
      cut(mine.kept);
      mine.received.assign(E, 0);
      for (size_t i = 0; i < mine.expert.size(); ++i) mine.received[mine.expert[i]] += mine.kept[i];
      comm::GlooOptions wo = o;
      wo.group = "workers";
      auto workers = comm::make_gloo_communicator(ns, rank, W, wo);
      CollectiveDispatcher d(*world, workers.get(), W, part, D);
      d.forward(0, 0, mine, x.data() + static_cast<size_t>(t0) * D,
                out.data() + static_cast<size_t>(t0) * k * D);
      d.backward(0, 0, mine, dout.data() + static_cast<size_t>(t0) * k * D,
                 dx.data() + static_cast<size_t>(t0) * D);
    } else {
      const int s = rank - W;
      expert_shard::ShardExperts experts(*world, W, s, part, mc);
      for (int i = 0; i < experts.num_local_experts(); ++i) {
        const size_t e = static_cast<size_t>(part.begin(s) + i);
        std::copy_n(model.params() + l.w1 + e * DF, DF, experts.params() + experts.w1_offset(0, i));
        std::copy_n(model.params() + l.w3 + e * DF, DF, experts.params() + experts.w3_offset(0, i));
        std::copy_n(model.params() + l.w2 + e * DF, DF, experts.params() + experts.w2_offset(0, i));
      }
      experts.serve_forward(0, 0);
      experts.serve_backward(0, 0);
      shard_grads[s].assign(experts.grads(), experts.grads() + experts.num_params());
      for (int i = 0; i < experts.num_local_experts(); ++i) {
        const size_t e = static_cast<size_t>(part.begin(s) + i);
        for (size_t j = 0; j < DF; ++j) {
          ASSERT_EQ(experts.grads()[experts.w1_offset(0, i) + j], model.grads()[l.w1 + e * DF + j]);
          ASSERT_EQ(experts.grads()[experts.w3_offset(0, i) + j], model.grads()[l.w3 + e * DF + j]);
          ASSERT_EQ(experts.grads()[experts.w2_offset(0, i) + j], model.grads()[l.w2 + e * DF + j]);
        }
      }
    }
  });
  EXPECT_EQ(out, out_ref);
  EXPECT_EQ(dx, dx_ref);
  if (all_to_one) {
    for (float g : shard_grads[1]) ASSERT_EQ(g, 0.f);  // shard 1 took part with nothing to do
  }
}

TEST(CollectiveDispatcher, EqualsLocalDispatcher) { check_dispatchers_agree(false); }
TEST(CollectiveDispatcher, EverySlotToOneExpertDoesNotHang) { check_dispatchers_agree(true); }

// Resident pages of [p, p + n) floats, counting only pages wholly inside it.
size_t resident_pages(const float* p, size_t n) {
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;
  const uintptr_t end = reinterpret_cast<uintptr_t>(p + n) / page * page;
  if (end <= begin) return 0;
  std::vector<unsigned char> vec((end - begin) / page);
  if (mincore(reinterpret_cast<void*>(begin), end - begin, vec.data()) != 0) return SIZE_MAX;
  size_t resident = 0;
  for (unsigned char v : vec) resident += v & 1;
  return resident;
}

// A worker's model never commits the experts' memory (the shards hold them); one process's does.
TEST(RemoteExperts, WorkerNeverCommitsExpertPages) {
  const model::ModelConfig c =
      model::load_config(std::string(LOOPMOE_SOURCE_DIR) + "/configs/loopmoe_tiny.toml").model;
  model::TrainConfig tc;
  for (bool remote : {true, false}) {
    model::Model m(c);
    m.set_remote_experts(remote);
    m.init_params(1);
    m.zero_grad();
    model::AdamW adam(m.layout(), tc);
    adam.step(m.params(), m.grads(), 1e-3, m.replica_ranges());
    size_t expert_pages = 0, replica_pages = 0;
    for (const model::ParamTensor& t : m.layout().tensors()) {
      size_t& count = model::is_expert_tensor(t) ? expert_pages : replica_pages;
      const float* const buffers[] = {m.params(), m.grads(), adam.m().data(), adam.v().data()};
      for (const float* base : buffers) {
        count += resident_pages(base + t.offset, t.numel());
      }
    }
    EXPECT_GT(replica_pages, 0u);
    if (remote) {
      EXPECT_EQ(expert_pages, 0u);
    } else {
      EXPECT_GT(expert_pages, 0u);  // the control: the test can tell
    }
  }
  model::Model m(c);
  m.set_remote_experts(true);
  m.init_params(1);
  std::vector<int32_t> tokens(c.seq_len, 1);
  EXPECT_THROW(m.forward(tokens.data(), tokens.data(), 1, c.seq_len), std::logic_error);
}

TEST(ExpertPartition, CoversEveryExpertOnce) {
  for (int E : {1, 5, 8, 41}) {
    for (int S = 1; S <= E && S <= 9; ++S) {
      ExpertPartition p(E, S);
      int next = 0;
      for (int s = 0; s < S; ++s) {
        EXPECT_EQ(p.begin(s), next);
        EXPECT_GE(p.size(s), E / S);
        EXPECT_LE(p.size(s), E / S + 1);
        for (int e = p.begin(s); e < p.end(s); ++e) EXPECT_EQ(p.owner(e), s);
        next = p.end(s);
      }
      EXPECT_EQ(next, E);
    }
  }
  EXPECT_THROW(ExpertPartition(4, 5), std::invalid_argument);
}

}  // namespace
}  // namespace loopmoe::runtime
