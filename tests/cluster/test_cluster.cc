// The distributed runtime against the single-process engine: the collective dispatcher gives the
// local dispatcher's numbers; W workers + S shards (threads, Gloo over loopback) reproduce the
// single-process trainer's loss curve; resume is bit-exact, also onto another shard count; a
// router that sends everything to one expert does not hang anything.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <optional>
#include <string>
#include <thread>
#include <utility>

#include "comm/gloo_communicator.h"
#include "comm/in_process_store.h"
#include "expert_shard/shard_experts.h"
#include "model/error.h"
#include "model/local_dispatcher.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "model/param_layout.h"
#include "model/rng.h"
#include "runtime/collective_dispatcher.h"
#include "runtime/create_runtime.h"
#include "runtime/process_checkpoint.h"
#include "tests/openblas_coretype.h"
#include "tests/tiny_run.h"
#include "train/trainer.h"

namespace loopmoe::runtime {
namespace {

namespace fs = std::filesystem;

// Runs fn(i) for i in [0, n) on n threads; rethrows the first exception.
void parallel(int n, const std::function<void(int)>& fn) {
  std::vector<std::exception_ptr> errors(n);
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      try {
        fn(i);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

// W workers and S shards of one job as threads of this process.
class ThreadCluster {
 public:
  ThreadCluster(const Config& config, int workers, int shards,
                std::optional<ResumePoint> resume = std::nullopt)
      : workers_(workers) {
    static int counter = 0;
    const std::string job = "test" + std::to_string(++counter);
    ns_ = std::make_unique<comm::NamespacedStore>(store_, job, 0);
    runtimes_.resize(workers + shards);
    parallel(workers + shards, [&](int i) {
      ProcessSetup s;
      s.job_id = job;
      s.role = i < workers ? Role::kWorker : Role::kExpertShard;
      s.rank = i < workers ? i : i - workers;
      s.num_workers = workers;
      s.num_shards = shards;
      s.config_toml = to_toml(config);
      s.resume = resume;
      s.store = ns_.get();
      s.collective_timeout = std::chrono::seconds(60);
      runtimes_[i] = create_runtime(s);
    });
  }
  // Runs `loops` per step; returns worker 0's reports.
  std::vector<StepReport> steps(int n, int loops) {
    std::vector<std::vector<StepReport>> all(runtimes_.size());
    parallel(size(), [&](int i) {
      for (int s = 0; s < n; ++s) all[i].push_back(runtimes_[i]->step(loops));
    });
    // Every worker reports the same global loss.
    for (int w = 1; w < workers_; ++w) {
      for (int s = 0; s < n; ++s) EXPECT_EQ(all[w][s].loss, all[0][s].loss);
    }
    return all[0];
  }
  double evaluate(int batches) {
    std::vector<double> v(size());
    parallel(size(), [&](int i) { v[i] = runtimes_[i]->evaluate(batches); });
    return v[0];
  }
  ResumePoint checkpoint(const fs::path& dir) {
    ResumePoint p;
    p.files.resize(size());
    parallel(size(), [&](int i) { p.files[i] = runtimes_[i]->checkpoint(dir.string()); });
    p.step = runtimes_[0]->steps_done();
    p.sampler = runtimes_[0]->sampler_state();
    return p;
  }
  int size() const { return static_cast<int>(runtimes_.size()); }

 private:
  int workers_;
  comm::InProcessStore store_;
  std::unique_ptr<comm::NamespacedStore> ns_;
  std::vector<std::unique_ptr<ProcessRuntime>> runtimes_;
};

std::vector<double> losses(const std::vector<StepReport>& reports) {
  std::vector<double> out;
  for (const StepReport& r : reports) out.push_back(r.loss);
  return out;
}

Config shipped_config(const char* name, const fs::path& data, int steps) {
  Config c = load_config(std::string(LOOPMOE_SOURCE_DIR) + "/configs/" + name);
  c.data.dir = data.string();
  c.train.steps = steps;
  c.train.warmup_steps = 10;
  c.train.eval_interval = 0;
  c.train.checkpoint_interval = 0;
  c.train.log_interval = 10;
  return c;
}

std::vector<double> single_process_losses(const Config& c, const fs::path& out) {
  TrainOptions o;
  o.out_dir = out.string();
  o.threads = 1;
  o.progress = false;
  return train(c, o).losses;
}

void expect_close_curves(const std::vector<double>& want, const std::vector<double>& got,
                         double rel) {
  ASSERT_EQ(want.size(), got.size());
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double r = std::abs(got[i] - want[i]) / std::abs(want[i]);
    worst = std::max(worst, r);
    EXPECT_LE(r, rel) << "step " << i + 1 << ": single process " << want[i] << ", cluster "
                      << got[i];
  }
  std::printf("worst relative difference over %zu steps: %.3g\n", want.size(), worst);
  if (std::getenv("LOOPMOE_PRINT_CURVES")) {
    for (size_t i = 0; i < want.size(); ++i) {
      std::printf("%zu %.3g\n", i + 1, std::abs(got[i] - want[i]) / std::abs(want[i]));
    }
  }
}

class ClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (auto why = testing::unsupported_openblas_coretype()) GTEST_SKIP() << *why;
    dir_ = testing::fresh_test_dir("dist",
                                   ::testing::UnitTest::GetInstance()->current_test_info()->name());
    testing::write_pattern_corpus(dir_ / "data");
    set_num_threads(1);
  }
  // Text-like data for the shipped configs (vocabulary 4096).
  fs::path text_data() {
    testing::write_zipf_markov_corpus(dir_ / "text", 4096, 400000);
    return dir_ / "text";
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

// --- The dispatcher seam: collective == local ---------------------------------------------------

// Forward outputs, input gradients and expert weight gradients of one MoE application through the
// collective dispatcher (2 workers holding halves of the tokens, 2 shards) equal the local
// dispatcher's. `all_to_one`: every slot goes to expert 0, so shard 1 and most experts get nothing.
void check_dispatchers_agree(bool all_to_one) {
  ModelConfig mc;
  mc.d_model = 16;
  mc.expert_hidden = 8;
  mc.n_experts = 5;
  mc.top_k = 2;
  mc.n_layers = 1;
  mc.vocab_size = 32;
  mc.n_heads = 2;
  mc.head_dim = 8;
  const int S = 12, D = mc.d_model, k = mc.top_k, E = mc.n_experts, W = 2, Sh = 2;
  Model model(mc);
  model.init_params(7);
  Rng rng(3);
  std::vector<float> x(static_cast<size_t>(S) * D), dout(static_cast<size_t>(S) * k * D);
  for (float& v : x) v = static_cast<float>(rng.normal());
  for (float& v : dout) v = static_cast<float>(rng.normal());
  RoutingPlan plan;
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
  LocalDispatcher local(mc, model.layout(), model.params(), model.grads());
  local.forward(0, 0, plan, x.data(), out_ref.data());
  local.backward(0, 0, plan, dout.data(), dx_ref.data());
  const LayerOffsets& l = model.layout().layers[0];
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
      RoutingPlan mine = plan;
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
  const ModelConfig c =
      load_config(std::string(LOOPMOE_SOURCE_DIR) + "/configs/loopmoe_tiny.toml").model;
  TrainConfig tc;
  for (bool remote : {true, false}) {
    Model m(c);
    m.set_remote_experts(remote);
    m.init_params(1);
    m.zero_grad();
    AdamW adam(m.layout(), tc);
    adam.step(m.params(), m.grads(), 1e-3, m.replica_ranges());
    size_t expert_pages = 0, replica_pages = 0;
    for (const ParamTensor& t : m.layout().tensors()) {
      size_t& count = is_expert_tensor(t) ? expert_pages : replica_pages;
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
  Model m(c);
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

// --- Whole runs ----------------------------------------------------------------------------------

// W workers + S shards reproduce `loopmoe train`'s 50-step curve bit for bit: every kernel is
// batch-invariant and every cross-worker sum is either an integer or the same fixed tree
// (docs/MODEL.md). ctest runs these under several OPENBLAS_CORETYPE values
// (tests/cluster/CMakeLists).
void expect_layouts_reproduce_single_process(const Config& c, const fs::path& dir) {
  const std::vector<double> want = single_process_losses(c, dir / "single");
  for (const auto& [workers, shards] : {std::pair{2, 2}, std::pair{4, 1}, std::pair{1, 3}}) {
    SCOPED_TRACE(std::to_string(workers) + " workers + " + std::to_string(shards) + " shards");
    ThreadCluster cluster(c, workers, shards);
    expect_close_curves(want, losses(cluster.steps(c.train.steps, c.model.n_loops)), 0.0);
  }
}

TEST_F(ClusterTest, ClusterLayoutsReproduceSingleProcessBitForBitVanillaTiny) {
  expect_layouts_reproduce_single_process(shipped_config("vanilla_tiny.toml", text_data(), 50),
                                          dir_);
}

TEST_F(ClusterTest, ClusterLayoutsReproduceSingleProcessBitForBitLoopMoeTiny) {
  expect_layouts_reproduce_single_process(shipped_config("loopmoe_tiny.toml", text_data(), 50),
                                          dir_);
}

// Capacity drops walk the global batch in order across workers; 3 workers split 4 sequences
// unevenly (1, 1, 2).
TEST_F(ClusterTest, CapacityDropsAndUnevenSlicesMatchSingleProcess) {
  Config c = testing::tiny_loopmoe_config(dir_ / "data");
  c.train.steps = 20;
  c.train.checkpoint_interval = 0;
  c.train.eval_interval = 0;
  const std::vector<double> want = single_process_losses(c, dir_ / "single");
  ThreadCluster cluster(c, 3, 3);
  const std::vector<StepReport> got = cluster.steps(20, c.model.n_loops);
  expect_close_curves(want, losses(got), 1e-5);
  int64_t dropped = 0;
  for (const StepReport& r : got) dropped += r.dropped;
  EXPECT_GT(dropped, 0) << "capacity factor 1.25 should drop something in 20 steps";
}

TEST_F(ClusterTest, ResumeIsBitExactAndRemapsExpertsOntoMoreShards) {
  Config c = testing::tiny_loopmoe_config(dir_ / "data");
  c.train.steps = 30;
  std::vector<double> straight;
  double straight_val = 0;
  {
    ThreadCluster cluster(c, 2, 2);
    straight = losses(cluster.steps(30, c.model.n_loops));
    straight_val = cluster.evaluate(2);
  }
  ResumePoint at15;
  std::vector<double> resumed;
  {
    ThreadCluster cluster(c, 2, 2);
    resumed = losses(cluster.steps(15, c.model.n_loops));
    at15 = cluster.checkpoint(dir_ / "ckpt15");
  }
  EXPECT_EQ(at15.step, 15);
  {
    ThreadCluster cluster(c, 2, 2, at15);
    for (double l : losses(cluster.steps(15, c.model.n_loops))) resumed.push_back(l);
    EXPECT_EQ(cluster.evaluate(2), straight_val);
  }
  ASSERT_EQ(resumed.size(), straight.size());
  for (size_t i = 0; i < straight.size(); ++i)
    EXPECT_EQ(resumed[i], straight[i]) << "step " << i + 1;
  // 2 shards → 3 shards (and 2 workers → 1): experts found by global id; next step the same.
  {
    ThreadCluster cluster(c, 1, 3, at15);
    EXPECT_EQ(cluster.steps(1, c.model.n_loops)[0].loss, straight[15]);
  }
}

TEST_F(ClusterTest, CorruptCheckpointFileIsOneClearError) {
  Config c = testing::tiny_loopmoe_config(dir_ / "data");
  ResumePoint p;
  {
    ThreadCluster cluster(c, 1, 2);
    cluster.steps(2, c.model.n_loops);
    p = cluster.checkpoint(dir_ / "ckpt");
  }
  const std::string shard_file = p.files[1].path;
  {
    std::fstream f(shard_file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(200);
    f.put('\x7f');
  }
  try {
    ThreadCluster cluster(c, 1, 2, p);
    FAIL() << "corrupt shard file accepted";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find(shard_file), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("checksum"), std::string::npos) << e.what();
  }
}

// --- Checkpoint files: every flipped bit, truncation and appended bytes are refused -------------
// (issue 11; the single-process checkpoint and token shards: tests/test_file_integrity.cc)

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary | std::ios::trunc) << bytes;
}

// XORs `mask` into byte `at` of the file in place.
void xor_byte(const fs::path& p, uint64_t at, unsigned char mask) {
  std::fstream f(p, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(at));
  const char b = static_cast<char>(f.get() ^ mask);
  f.seekp(static_cast<std::streamoff>(at));
  f.put(b);
}

// Flips every bit of every byte of the file in turn (and back); `read` must throw
// CheckpointError naming the file each time. Returns the number of corrupted files tried.
int expect_every_flip_detected(const fs::path& p, const std::function<void()>& read) {
  const uint64_t size = fs::file_size(p);
  int tried = 0, missed = 0;
  for (uint64_t at = 0; at < size; ++at) {
    for (int bit = 0; bit < 8; ++bit) {
      const auto mask = static_cast<unsigned char>(1 << bit);
      xor_byte(p, at, mask);
      ++tried;
      try {
        read();
        if (++missed <= 10) ADD_FAILURE() << "byte " << at << " ^ " << int{mask} << " accepted";
      } catch (const CheckpointError& e) {
        if (std::string(e.what()).rfind(p.string(), 0) != 0) ADD_FAILURE() << e.what();
      }
      xor_byte(p, at, mask);
    }
  }
  EXPECT_EQ(missed, 0) << "of " << tried << " corrupted files";
  return tried;
}

void expect_checkpoint_error(const std::function<void()>& fn, const std::string& what) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected \"" << what << "\"";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
  }
}

std::vector<float> ramp(size_t n, float scale) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = scale * static_cast<float>(i) - 1.f;
  return v;
}

WorkerCheckpoint small_worker_checkpoint() {
  WorkerCheckpoint c;
  c.rank = 1;
  c.step = 5;
  c.adam_steps = 5;
  c.sampler = {7, 1, 3};
  c.config_hash = 0x0123456789abcdefULL;
  c.params = ramp(40, 0.5f);
  c.m = ramp(40, 0.25f);
  c.v = ramp(40, 0.125f);
  return c;
}

ShardCheckpoint small_shard_checkpoint() {
  ShardCheckpoint c;
  c.rank = 2;
  c.step = 5;
  c.adam_steps = 5;
  c.config_hash = 0x0123456789abcdefULL;
  c.num_layers = 2;
  c.first_expert = 1;
  c.num_experts = 2;
  c.floats_per_expert = 6;
  c.params = ramp(24, 0.5f);
  c.m = ramp(24, 0.25f);
  c.v = ramp(24, 0.125f);
  return c;
}

void expect_same(const WorkerCheckpoint& a, const WorkerCheckpoint& b) {
  EXPECT_EQ(a.rank, b.rank);
  EXPECT_EQ(a.step, b.step);
  EXPECT_EQ(a.adam_steps, b.adam_steps);
  EXPECT_EQ(a.sampler.seed, b.sampler.seed);
  EXPECT_EQ(a.sampler.epoch, b.sampler.epoch);
  EXPECT_EQ(a.sampler.index, b.sampler.index);
  EXPECT_EQ(a.config_hash, b.config_hash);
  EXPECT_EQ(a.params, b.params);
  EXPECT_EQ(a.m, b.m);
  EXPECT_EQ(a.v, b.v);
}

void expect_same(const ShardCheckpoint& a, const ShardCheckpoint& b) {
  EXPECT_EQ(a.rank, b.rank);
  EXPECT_EQ(a.step, b.step);
  EXPECT_EQ(a.adam_steps, b.adam_steps);
  EXPECT_EQ(a.config_hash, b.config_hash);
  EXPECT_EQ(a.num_layers, b.num_layers);
  EXPECT_EQ(a.first_expert, b.first_expert);
  EXPECT_EQ(a.num_experts, b.num_experts);
  EXPECT_EQ(a.floats_per_expert, b.floats_per_expert);
  EXPECT_EQ(a.params, b.params);
  EXPECT_EQ(a.m, b.m);
  EXPECT_EQ(a.v, b.v);
}

// Header sizes: version 2 is version 1's header plus the 8-byte header checksum.
constexpr size_t kWorkerHeaderV1 = 80, kShardHeaderV1 = 72, kVersionAt = 8;

TEST_F(ClusterTest, CorruptWorkerCheckpointAnyBitFlipIsDetected) {
  const fs::path path = dir_ / "worker-1.bin";
  const WorkerCheckpoint c = small_worker_checkpoint();
  int64_t bytes = 0;
  const uint64_t sum = write_worker_checkpoint(path.string(), c, &bytes);
  ASSERT_EQ(static_cast<uint64_t>(bytes), fs::file_size(path));
  ASSERT_EQ(fs::file_size(path), kWorkerHeaderV1 + 8 + 3 * 40 * sizeof(float));
  expect_same(read_worker_checkpoint(path.string(), 0), c);
  expect_same(read_worker_checkpoint(path.string(), sum), c);
  expect_checkpoint_error([&] { read_worker_checkpoint(path.string(), sum + 1); },
                          "differs from the one recorded in the checkpoint metadata");
  // Detected by the file itself, whether or not the caller has a recorded checksum.
  const int tried =
      expect_every_flip_detected(path, [&] { read_worker_checkpoint(path.string(), 0); });
  EXPECT_EQ(tried, 8 * bytes);
  expect_every_flip_detected(path, [&] { read_worker_checkpoint(path.string(), sum); });
  expect_same(read_worker_checkpoint(path.string(), sum), c);
}

TEST_F(ClusterTest, CorruptShardCheckpointAnyBitFlipIsDetected) {
  const fs::path path = dir_ / "shard-2.bin";
  const ShardCheckpoint c = small_shard_checkpoint();
  int64_t bytes = 0;
  const uint64_t sum = write_shard_checkpoint(path.string(), c, &bytes);
  ASSERT_EQ(static_cast<uint64_t>(bytes), fs::file_size(path));
  ASSERT_EQ(fs::file_size(path), kShardHeaderV1 + 8 + 3 * 24 * sizeof(float));
  expect_same(read_shard_checkpoint(path.string(), 0), c);
  expect_same(read_shard_checkpoint(path.string(), sum), c);
  expect_checkpoint_error([&] { read_shard_checkpoint(path.string(), sum ^ 1); },
                          "differs from the one recorded in the checkpoint metadata");
  const int tried =
      expect_every_flip_detected(path, [&] { read_shard_checkpoint(path.string(), 0); });
  EXPECT_EQ(tried, 8 * bytes);
  expect_every_flip_detected(path, [&] { read_shard_checkpoint(path.string(), sum); });
  expect_same(read_shard_checkpoint(path.string(), sum), c);
}

TEST_F(ClusterTest, CorruptProcessCheckpointTruncatedOrExtendedIsRefused) {
  const fs::path worker = dir_ / "worker-1.bin", shard = dir_ / "shard-2.bin";
  write_worker_checkpoint(worker.string(), small_worker_checkpoint(), nullptr);
  write_shard_checkpoint(shard.string(), small_shard_checkpoint(), nullptr);
  for (const auto& file :
       {std::pair{worker, kWorkerHeaderV1 + 8}, std::pair{shard, kShardHeaderV1 + 8}}) {
    // Named copies, not a structured binding: the lambda below captures the path, which clang 14
    // (the thread-safety check's compiler) refuses for a binding.
    const fs::path& path = file.first;
    const size_t header = file.second;
    SCOPED_TRACE(path.string());
    const std::string whole = read_bytes(path);
    const auto read = [&] {
      if (path == worker) {
        read_worker_checkpoint(path.string(), 0);
      } else {
        read_shard_checkpoint(path.string(), 0);
      }
    };
    for (size_t keep : {size_t{0}, size_t{8}, header - 9, header - 1}) {
      write_bytes(path, whole.substr(0, keep));
      expect_checkpoint_error(read,
                              path.string() + ": truncated checkpoint file (no complete header)");
    }
    for (size_t keep : {header, header + 1, whole.size() - 1}) {
      write_bytes(path, whole.substr(0, keep));
      expect_checkpoint_error(read, path.string() + ": truncated checkpoint file: header implies " +
                                        std::to_string(whole.size()) + " bytes, file has " +
                                        std::to_string(keep));
    }
    write_bytes(path, whole + '\0');
    expect_checkpoint_error(read,
                            path.string() + ": trailing bytes after the checkpoint file's data");
    std::string v3 = whole;
    v3[kVersionAt] = 3;
    write_bytes(path, v3);
    expect_checkpoint_error(read,
                            "checkpoint file version 3 is not supported (this build reads "
                            "versions 1 and 2");
  }
}

// Version 1 files (a job committed before the upgrade) still resume: version 2's bytes without
// the header checksum. Their recorded checksum is the payload's, which the header holds.
TEST_F(ClusterTest, ProcessCheckpointVersion1StillReads) {
  const fs::path worker = dir_ / "worker-1.bin", shard = dir_ / "shard-2.bin";
  const WorkerCheckpoint w = small_worker_checkpoint();
  const ShardCheckpoint s = small_shard_checkpoint();
  write_worker_checkpoint(worker.string(), w, nullptr);
  write_shard_checkpoint(shard.string(), s, nullptr);
  const auto to_v1 = [](const fs::path& p, size_t v1_header) {
    const std::string v2 = read_bytes(p);
    std::string v1 = v2.substr(0, v1_header) + v2.substr(v1_header + 8);
    v1[kVersionAt] = 1;
    write_bytes(p, v1);
    uint64_t payload_sum = 0;
    std::memcpy(&payload_sum, v1.data() + v1_header - 8, 8);  // the header's last field
    return payload_sum;
  };
  const uint64_t worker_sum = to_v1(worker, kWorkerHeaderV1);
  const uint64_t shard_sum = to_v1(shard, kShardHeaderV1);
  expect_same(read_worker_checkpoint(worker.string(), 0), w);
  expect_same(read_worker_checkpoint(worker.string(), worker_sum), w);
  expect_same(read_shard_checkpoint(shard.string(), 0), s);
  expect_same(read_shard_checkpoint(shard.string(), shard_sum), s);
  expect_checkpoint_error([&] { read_worker_checkpoint(worker.string(), worker_sum + 1); },
                          "differs from the one recorded");
  xor_byte(shard, fs::file_size(shard) - 1, 0x01);
  expect_checkpoint_error([&] { read_shard_checkpoint(shard.string(), 0); },
                          shard.string() + ": checksum mismatch (file is corrupt)");
}

// A router with zero weights ties every expert; top-1 then sends every token to expert 0 (lowest
// index wins ties): shard 1 and experts 1.. receive nothing, yet every collective completes.
TEST_F(ClusterTest, RouterSendingEverythingToOneExpertDoesNotHang) {
  Config c = testing::tiny_loopmoe_config(dir_ / "data");
  c.model.top_k = 1;
  c.model.capacity_factor = 0;
  ResumePoint p;
  {
    ThreadCluster cluster(c, 2, 2);
    p = cluster.checkpoint(dir_ / "ckpt0");
  }
  // Zero the routers in the worker files (packed replica order = layout order minus experts).
  Model m(c.model);
  for (CheckpointFileRef& f : p.files) {
    if (f.role != Role::kWorker) continue;
    WorkerCheckpoint w = read_worker_checkpoint(f.path, f.xxh64);
    size_t packed = 0;
    for (const ParamTensor& t : m.layout().tensors()) {
      const bool expert = t.name.find(".moe.w") != std::string::npos;
      if (expert) continue;
      if (t.name.find(".moe.router") != std::string::npos) {
        std::fill_n(w.params.begin() + static_cast<ptrdiff_t>(packed), t.numel(), 0.f);
      }
      packed += t.numel();
    }
    ASSERT_EQ(packed, w.params.size());
    f.xxh64 = write_worker_checkpoint(f.path, w, &f.bytes);
  }
  ThreadCluster cluster(c, 2, 2, p);
  const std::vector<StepReport> r = cluster.steps(1, c.model.n_loops);
  const int E = c.model.n_experts;
  const int64_t tokens = r[0].tokens;
  ASSERT_EQ(r[0].expert_tokens.size(), static_cast<size_t>(E) * c.model.depth());
  for (int a = 0; a < c.model.depth(); ++a) {
    EXPECT_EQ(r[0].expert_tokens[static_cast<size_t>(a) * E], tokens) << "application " << a;
  }
  EXPECT_TRUE(std::isfinite(r[0].loss));
  // And it keeps training (routers learn to spread) without hanging.
  for (const StepReport& s : cluster.steps(3, c.model.n_loops)) EXPECT_TRUE(std::isfinite(s.loss));
}

TEST_F(ClusterTest, VariableLoopCountsPerStep) {
  Config c = testing::tiny_loopmoe_config(dir_ / "data");
  ThreadCluster cluster(c, 2, 1);
  for (int loops : {1, 3, 2}) {
    const StepReport r = cluster.steps(1, loops)[0];
    EXPECT_EQ(r.loops, loops);
    EXPECT_EQ(r.expert_tokens.size(),
              static_cast<size_t>(c.model.n_experts) * c.model.n_layers * loops);
    EXPECT_TRUE(std::isfinite(r.loss));
  }
}

TEST_F(ClusterTest, BadSetupIsOneClearError) {
  Config c = testing::tiny_loopmoe_config(dir_ / "data");
  comm::InProcessStore store;
  ProcessSetup s;
  s.job_id = "bad";
  s.store = &store;
  s.num_shards = 5;  // 4 experts
  s.config_toml = to_toml(c);
  EXPECT_THROW(create_runtime(s), ConfigError);
  s.num_shards = 1;
  s.config_toml = "[model]\nd_modle = 3\n";
  try {
    create_runtime(s);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("d_modle"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace loopmoe::runtime
