// The two ProcessRuntimes: WorkerRuntime (a data-parallel replica of everything but the experts)
// and ShardRuntime (the experts of one shard). One training step, in the order every process
// meets in collectives:
//   workers: sample the global batch, keep their slice; forward (per MoE application: router
//            statistics all-reduced among workers, dispatch/combine with the shards); backward
//            (the mirror image); replica gradients all-reduced among workers;
//   all:     squared gradient norms all-reduced over the world (worker 0's replica + every
//            shard's experts) → one global clipping coefficient; each process steps its AdamW;
//   workers: loss parts all-reduced among workers.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <utility>

#include "comm/gloo_communicator.h"
#include "dataloader/token_shard.h"
#include "dist/collective_dispatcher.h"
#include "dist/process_checkpoint.h"
#include "dist/process_runtime.h"
#include "dist/shard_experts.h"
#include "model/config.h"
#include "model/error.h"
#include "model/model.h"
#include "model/ops.h"
#include "model/optimizer.h"

namespace loopmoe::dist {

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string file_name(Role role, int rank) {
  return std::string(role == Role::kWorker ? "worker-" : "shard-") + std::to_string(rank) + ".bin";
}

comm::GlooOptions gloo_options(const ProcessSetup& s, const char* group) {
  comm::GlooOptions o;
  o.hostname = s.hostname;
  o.timeout = s.collective_timeout;
  o.rendezvous_timeout = s.rendezvous_timeout;
  o.group = group;
  return o;
}

// Sum of squares in double over the given pieces, in a fixed order.
double sum_of_squares(const float* g, size_t n) {
  const double norm = global_norm(g, n);
  return norm * norm;
}

class RuntimeBase : public ProcessRuntime {
 public:
  RuntimeBase(const ProcessSetup& setup, Config config)
      : setup_(setup),
        config_(std::move(config)),
        config_hash_(config_hash(to_toml(config_))),
        partition_(config_.model.n_experts, setup.num_shards) {
    set_threads();
  }
  Role role() const override { return setup_.role; }
  int rank() const override { return setup_.rank; }
  int64_t steps_done() const override { return steps_done_; }

 protected:
  void set_threads() const { set_num_threads(setup_.threads); }
  int world_rank() const {
    return setup_.role == Role::kWorker ? setup_.rank : setup_.num_workers + setup_.rank;
  }
  void connect_world() {
    world_ = comm::make_gloo_communicator(*setup_.store, world_rank(),
                                          setup_.num_workers + setup_.num_shards,
                                          gloo_options(setup_, "world"));
  }
  // Global gradient norm from this process's share of the squared norm; the clipping coefficient
  // (1 when not clipping), as clip_grad_norm computes it in one process.
  std::pair<double, float> global_clip(double local_sum_of_squares) {
    double total = local_sum_of_squares;
    world_->allreduce_sum(&total, 1);
    const double norm = std::sqrt(total);
    float coef = 1.f;
    const double max_norm = config_.train.grad_clip;
    if (max_norm > 0) {
      const double c = max_norm / (norm + 1e-6);
      if (c < 1.0) coef = static_cast<float>(c);
    }
    return {norm, coef};
  }
  // The parts of a step report both roles fill alike.
  StepReport report(int loops, double lr, double grad_norm, const AllToAllStats& a2a,
                    Clock::time_point t0) const {
    StepReport r;
    r.step = steps_done_;
    r.loops = loops;
    r.lr = lr;
    r.grad_norm = grad_norm;
    r.num_experts = config_.model.n_experts;
    r.tokens = static_cast<int64_t>(config_.train.batch_size) * config_.model.seq_len;
    r.alltoall_bytes = a2a.bytes_sent;
    r.alltoall_seconds = a2a.seconds;
    r.seconds = seconds_since(t0);
    return r;
  }
  // A checkpoint file must be of this job's config and of the step the metadata names.
  void check_resume_file(uint64_t hash, int64_t step, int64_t want_step,
                         const std::string& path) const {
    if (hash != config_hash_) {
      throw CheckpointError(path + ": written for a different config than this job's");
    }
    if (step != want_step) {
      throw CheckpointError(path + ": is step " + std::to_string(step) +
                            ", the checkpoint metadata says " + std::to_string(want_step));
    }
  }

  ProcessSetup setup_;
  Config config_;
  uint64_t config_hash_;
  ExpertPartition partition_;
  std::unique_ptr<comm::Communicator> world_;
  int64_t steps_done_ = 0;
};

class WorkerRuntime final : public RuntimeBase {
 public:
  WorkerRuntime(const ProcessSetup& setup, Config config)
      : RuntimeBase(setup, std::move(config)),
        train_shard_(data::TokenShard::open(fs::path(config_.data.dir) / "train.bin")),
        val_shard_(data::TokenShard::open(fs::path(config_.data.dir) / "val.bin")),
        model_(config_.model),
        adam_(model_.layout(), config_.train),
        sampler_(train_shard_, config_.train.batch_size, config_.model.seq_len, config_.train.seed,
                 /*shuffle=*/true),
        ranges_(model_.replica_ranges()) {
    const int B = config_.train.batch_size, W = setup.num_workers;
    if (W > B) {
      throw ConfigError("job has " + std::to_string(W) + " workers but train.batch_size is " +
                        std::to_string(B) + ": every worker needs at least one sequence");
    }
    for (const data::TokenShard* s : {&train_shard_, &val_shard_}) {
      if (s->vocab_size() > static_cast<uint32_t>(config_.model.vocab_size)) {
        throw ConfigError(s->path().string() + ": shard vocabulary " +
                          std::to_string(s->vocab_size()) + " exceeds model.vocab_size " +
                          std::to_string(config_.model.vocab_size));
      }
    }
    row_begin_ = static_cast<int>(static_cast<int64_t>(setup.rank) * B / W);
    row_end_ = static_cast<int>(static_cast<int64_t>(setup.rank + 1) * B / W);
    for (const auto& r : ranges_) replica_size_ += r.second;
    // Each worker holds a subtree of the single process's gradient groups (exact when W is a
    // power of two dividing them; see combine_replica_grads).
    model_.set_grad_groups(std::max(1, std::min(config_.train.grad_groups, B) / W));
    model_.set_remote_experts(true);  // the shards hold them: their pages stay uncommitted here
    model_.init_params(config_.train.seed);
    model_.set_loss_token_count(static_cast<int64_t>(B) * config_.model.seq_len);
    if (setup.resume) load(*setup.resume);
    connect_world();
    if (W > 1) {
      workers_ =
          comm::make_gloo_communicator(*setup.store, setup.rank, W, gloo_options(setup, "workers"));
    }
    dispatcher_ = std::make_unique<CollectiveDispatcher>(*world_, workers_.get(), W, partition_,
                                                         config_.model.d_model);
    model_.set_dispatcher(dispatcher_.get());
  }

  StepReport step(int loops) override {
    set_threads();
    const auto t0 = Clock::now();
    const TrainConfig& tc = config_.train;
    const int T = config_.model.seq_len, B = tc.batch_size, Bw = row_end_ - row_begin_;
    batch_in_.resize(static_cast<size_t>(B) * T);
    batch_tg_.resize(batch_in_.size());
    sampler_.next(batch_in_.data(), batch_tg_.data());
    const size_t first = static_cast<size_t>(row_begin_) * T;
    dispatcher_->stats() = {};
    model_.zero_grad();
    const LossParts loss =
        model_.forward(batch_in_.data() + first, batch_tg_.data() + first, Bw, T, loops);
    model_.backward();
    // Replica gradients, packed once: each worker's covers its slice, scaled by the global token
    // count; combined over the workers, worker 0's share of the global norm, clipped, unpacked.
    float* g = model_.grads();
    pack(g, packed_);
    if (workers_) combine_replica_grads();
    const auto [norm, coef] =
        global_clip(setup_.rank == 0 ? sum_of_squares(packed_.data(), packed_.size()) : 0.0);
    if (coef != 1.f) {
      for (float& x : packed_) x *= coef;
    }
    unpack(packed_, g);
    const double lr = learning_rate(tc, static_cast<int>(steps_done_));
    adam_.step(model_.params(), g, lr, ranges_);
    ++steps_done_;

    StepReport r = report(loops, lr, norm, dispatcher_->stats(), t0);
    // The cross-entropy sums are integers (ops::LossSum), so adding the workers' gives the single
    // process's sum bit for bit.
    int64_t parts[3] = {loss.ce_sum.units, loss.ce_sum.invalid, loss.dropped};
    if (workers_) workers_->allreduce_sum(parts, 3);
    r.ce = ops::LossSum{parts[0], parts[1]}.value() / static_cast<double>(B * T);
    r.dropped = parts[2];
    r.aux = loss.aux;
    r.z = loss.z;
    r.loss = r.ce + config_.model.aux_loss_coef * r.aux + config_.model.z_loss_coef * r.z;
    if (setup_.rank == 0) {
      for (int a = 0; a < model_.applications(); ++a) {
        const auto& kept = model_.routing(a).batch_kept;
        r.expert_tokens.insert(r.expert_tokens.end(), kept.begin(), kept.end());
      }
    }
    r.seconds = seconds_since(t0);  // the loss reduction included
    return r;
  }

  double evaluate(int batches) override {
    set_threads();
    const int T = config_.model.seq_len, B = config_.train.batch_size, Bw = row_end_ - row_begin_;
    data::BatchSampler val(val_shard_, B, T, 0, /*shuffle=*/false);
    std::vector<int32_t> in(static_cast<size_t>(B) * T), tg(in.size());
    const size_t first = static_cast<size_t>(row_begin_) * T;
    double total = 0;
    for (int i = 0; i < batches; ++i) {
      val.next(in.data(), tg.data());
      const ops::LossSum sum = model_.forward(in.data() + first, tg.data() + first, Bw, T).ce_sum;
      int64_t parts[2] = {sum.units, sum.invalid};
      if (workers_) workers_->allreduce_sum(parts, 2);
      total += ops::LossSum{parts[0], parts[1]}.value() / static_cast<double>(B * T);
    }
    return batches > 0 ? total / batches : 0.0;
  }

  CheckpointFileRef checkpoint(const std::string& dir) override {
    WorkerCheckpoint c;
    c.rank = setup_.rank;
    c.step = steps_done_;
    c.adam_steps = adam_.steps_taken();
    c.sampler = sampler_.state();
    c.config_hash = config_hash_;
    pack(model_.params(), c.params);
    pack(adam_.m().data(), c.m);
    pack(adam_.v().data(), c.v);
    CheckpointFileRef ref;
    ref.role = Role::kWorker;
    ref.rank = setup_.rank;
    ref.path = fs::absolute(fs::path(dir) / file_name(Role::kWorker, setup_.rank)).string();
    ref.xxh64 = write_worker_checkpoint(ref.path, c, &ref.bytes);
    return ref;
  }

  data::SamplerState sampler_state() const override { return sampler_.state(); }

 private:
  // packed_ becomes the sum of the workers' replica gradients in the pairwise tree over workers
  // that continues the tree each worker ran over its own gradient groups, so the result is the
  // single process's. Two workers: an all-reduce adds a + b (the same bits in either order). More:
  // every worker gathers all partial sums (an all-reduce of zero-padded slots, exact) and runs the
  // tree.
  void combine_replica_grads() {
    const int W = setup_.num_workers;
    if (W == 2) {
      workers_->allreduce_sum(packed_.data(), packed_.size());
    } else {
      const size_t n = packed_.size();
      gathered_.assign(n * W, 0.f);
      std::copy(packed_.begin(), packed_.end(),
                gathered_.begin() + static_cast<ptrdiff_t>(n * setup_.rank));
      workers_->allreduce_sum(gathered_.data(), gathered_.size());
      ops::tree_sum_groups(gathered_.data(), n, W, {{0, n}});
      std::copy_n(gathered_.begin(), n, packed_.begin());
    }
  }
  void pack(const float* src, std::vector<float>& out) const {
    out.resize(replica_size_);
    size_t at = 0;
    for (const auto& [offset, n] : ranges_) {
      std::copy_n(src + offset, n, out.data() + at);
      at += n;
    }
  }
  void unpack(const std::vector<float>& in, float* dst) const {
    size_t at = 0;
    for (const auto& [offset, n] : ranges_) {
      std::copy_n(in.data() + at, n, dst + offset);
      at += n;
    }
  }
  void load(const ResumePoint& resume) {
    // Workers are replicas: this rank's file if the checkpoint has one, else any worker's.
    const CheckpointFileRef* pick = nullptr;
    for (const CheckpointFileRef& f : resume.files) {
      if (f.role != Role::kWorker) continue;
      if (pick == nullptr || f.rank == setup_.rank) pick = &f;
    }
    if (pick == nullptr) throw CheckpointError("checkpoint has no worker file to resume from");
    const WorkerCheckpoint c = read_worker_checkpoint(pick->path, pick->xxh64);
    if (c.params.size() != replica_size_) {
      throw CheckpointError(pick->path + ": holds " + std::to_string(c.params.size()) +
                            " replica parameters, this model has " + std::to_string(replica_size_));
    }
    check_resume_file(c.config_hash, c.step, resume.step, pick->path);
    unpack(c.params, model_.params());
    unpack(c.m, adam_.m().data());
    unpack(c.v, adam_.v().data());
    adam_.set_steps_taken(c.adam_steps);
    sampler_.restore(c.sampler);
    steps_done_ = c.step;
  }

  data::TokenShard train_shard_, val_shard_;
  Model model_;
  AdamW adam_;
  data::BatchSampler sampler_;
  const std::vector<std::pair<size_t, size_t>>& ranges_;  // the model's replica ranges
  size_t replica_size_ = 0;
  int row_begin_ = 0, row_end_ = 0;  // this worker's rows of the global batch
  std::unique_ptr<comm::Communicator> workers_;
  std::unique_ptr<CollectiveDispatcher> dispatcher_;
  std::vector<int32_t> batch_in_, batch_tg_;
  std::vector<float> packed_, gathered_;
};

class ShardRuntime final : public RuntimeBase {
 public:
  ShardRuntime(const ProcessSetup& setup, Config config) : RuntimeBase(setup, std::move(config)) {
    connect_world();
    experts_ = std::make_unique<ShardExperts>(*world_, setup.num_workers, setup.rank, partition_,
                                              config_.model);
    adam_ = std::make_unique<AdamW>(std::vector<uint8_t>(experts_->num_params(), 1), config_.train);
    init_from_model();
    if (setup.resume) load(*setup.resume);
  }

  StepReport step(int loops) override {
    set_threads();
    const auto t0 = Clock::now();
    const int N = config_.model.n_layers, A = N * loops;
    experts_->stats() = {};
    experts_->zero_grad();
    for (int a = 0; a < A; ++a) experts_->serve_forward(a, a % N);
    for (int a = A - 1; a >= 0; --a) experts_->serve_backward(a, a % N);
    float* g = experts_->grads();
    const size_t n = experts_->num_params();
    const auto [norm, coef] = global_clip(sum_of_squares(g, n));
    if (coef != 1.f) {
      for (size_t i = 0; i < n; ++i) g[i] *= coef;
    }
    const double lr = learning_rate(config_.train, static_cast<int>(steps_done_));
    adam_->step(experts_->params(), g, lr);
    ++steps_done_;
    return report(loops, lr, norm, experts_->stats(), t0);
  }

  double evaluate(int batches) override {
    set_threads();
    const int N = config_.model.n_layers, A = N * config_.model.n_loops;
    for (int i = 0; i < batches; ++i) {
      for (int a = 0; a < A; ++a) experts_->serve_forward(a, a % N);
    }
    return 0.0;
  }

  CheckpointFileRef checkpoint(const std::string& dir) override {
    ShardCheckpoint c;
    c.rank = setup_.rank;
    c.step = steps_done_;
    c.adam_steps = adam_->steps_taken();
    c.config_hash = config_hash_;
    c.num_layers = experts_->num_layers();
    c.first_expert = experts_->first_expert();
    c.num_experts = experts_->num_local_experts();
    c.floats_per_expert = experts_->params_per_expert();
    gather(experts_->params(), c.params);
    gather(adam_->m().data(), c.m);
    gather(adam_->v().data(), c.v);
    CheckpointFileRef ref;
    ref.role = Role::kExpertShard;
    ref.rank = setup_.rank;
    ref.path = fs::absolute(fs::path(dir) / file_name(Role::kExpertShard, setup_.rank)).string();
    ref.xxh64 = write_shard_checkpoint(ref.path, c, &ref.bytes);
    return ref;
  }

  data::SamplerState sampler_state() const override { return {}; }

 private:
  // Per-expert blocks [w1, w3, w2] of (layer, local expert i) ↔ the shard's buffer.
  template <typename Fn>
  void for_each_block(Fn&& fn) const {
    const size_t DF = static_cast<size_t>(config_.model.d_model) * config_.model.expert_hidden;
    for (int n = 0; n < experts_->num_layers(); ++n) {
      for (int i = 0; i < experts_->num_local_experts(); ++i) {
        fn(n, i, experts_->w1_offset(n, i), experts_->w3_offset(n, i), experts_->w2_offset(n, i),
           DF);
      }
    }
  }
  void gather(const float* src, std::vector<float>& out) const {
    out.clear();
    for_each_block([&](int, int, size_t a, size_t b, size_t c, size_t DF) {
      for (size_t off : {a, b, c}) out.insert(out.end(), src + off, src + off + DF);
    });
  }
  // The same initial values as a single process (the one random stream of init_params), without
  // materialising the model: keep our experts of each w1 / w3 / w2 tensor as it goes by.
  void init_from_model() {
    const ParamLayout layout(config_.model);
    const size_t DF = static_cast<size_t>(config_.model.d_model) * config_.model.expert_hidden;
    const size_t first = static_cast<size_t>(experts_->first_expert());
    float* p = experts_->params();
    visit_initial_params(config_.model, layout, config_.train.seed, is_expert_tensor,
                         [&](const ParamTensor& t, const float* values) {
                           for (int n = 0; n < experts_->num_layers(); ++n) {
                             const LayerOffsets& l = layout.layers[n];
                             for (int i = 0; i < experts_->num_local_experts(); ++i) {
                               const float* src = values + (first + static_cast<size_t>(i)) * DF;
                               if (t.offset == l.w1)
                                 std::copy_n(src, DF, p + experts_->w1_offset(n, i));
                               if (t.offset == l.w3)
                                 std::copy_n(src, DF, p + experts_->w3_offset(n, i));
                               if (t.offset == l.w2)
                                 std::copy_n(src, DF, p + experts_->w2_offset(n, i));
                             }
                           }
                         });
  }
  // Any number of shard files may hold our experts (the checkpoint may come from a different
  // shard count): take each owned (layer, expert) from the file whose range holds it.
  void load(const ResumePoint& resume) {
    std::vector<uint8_t> found(
        static_cast<size_t>(experts_->num_layers()) * experts_->num_local_experts(), 0);
    int64_t adam_steps = -1;
    // The writing shards' ranges follow from their count: read only the files that overlap ours.
    int old_shards = 0;
    for (const CheckpointFileRef& f : resume.files) old_shards += f.role == Role::kExpertShard;
    const int lo = experts_->first_expert(), hi = lo + experts_->num_local_experts();
    for (const CheckpointFileRef& f : resume.files) {
      if (f.role != Role::kExpertShard) continue;
      if (f.rank >= 0 && f.rank < old_shards && old_shards <= config_.model.n_experts) {
        const ExpertPartition old(config_.model.n_experts, old_shards);
        if (old.end(f.rank) <= lo || old.begin(f.rank) >= hi) continue;
      }
      const ShardCheckpoint c = read_shard_checkpoint(f.path, f.xxh64);
      check_resume_file(c.config_hash, c.step, resume.step, f.path);
      if (c.num_layers != experts_->num_layers() ||
          c.floats_per_expert != experts_->params_per_expert()) {
        throw CheckpointError(f.path + ": expert shapes differ from this job's model");
      }
      adam_steps = c.adam_steps;
      for_each_block([&](int n, int i, size_t a, size_t b, size_t cc, size_t DF) {
        const int e = lo + i;
        if (e < c.first_expert || e >= c.first_expert + c.num_experts) return;
        const size_t src =
            (static_cast<size_t>(n) * c.num_experts + (e - c.first_expert)) * c.floats_per_expert;
        const std::vector<float>* from[3] = {&c.params, &c.m, &c.v};
        float* to[3] = {experts_->params(), adam_->m().data(), adam_->v().data()};
        for (int k = 0; k < 3; ++k) {
          std::copy_n(from[k]->data() + src, DF, to[k] + a);
          std::copy_n(from[k]->data() + src + DF, DF, to[k] + b);
          std::copy_n(from[k]->data() + src + 2 * DF, DF, to[k] + cc);
        }
        found[static_cast<size_t>(n) * experts_->num_local_experts() + i] = 1;
      });
    }
    for (size_t j = 0; j < found.size(); ++j) {
      if (!found[j]) {
        const int n = static_cast<int>(j / experts_->num_local_experts());
        const int e =
            experts_->first_expert() + static_cast<int>(j % experts_->num_local_experts());
        throw CheckpointError("checkpoint at step " + std::to_string(resume.step) +
                              " has no file holding expert " + std::to_string(e) + " of layer " +
                              std::to_string(n));
      }
    }
    adam_->set_steps_taken(adam_steps);
    steps_done_ = resume.step;
  }

  std::unique_ptr<ShardExperts> experts_;
  std::unique_ptr<AdamW> adam_;
};

}  // namespace

std::unique_ptr<ProcessRuntime> create_runtime(const ProcessSetup& setup) {
  if (setup.store == nullptr) throw std::invalid_argument("create_runtime: no rendezvous store");
  if (setup.num_workers < 1 || setup.num_shards < 1) {
    throw ConfigError("a job needs at least one worker and one expert shard");
  }
  const int role_size = setup.role == Role::kWorker ? setup.num_workers : setup.num_shards;
  if (setup.rank < 0 || setup.rank >= role_size) {
    throw ConfigError(std::string(to_string(setup.role)) + " rank " + std::to_string(setup.rank) +
                      " is outside 0.." + std::to_string(role_size - 1));
  }
  Config config = parse_config(setup.config_toml, "job " + setup.job_id);
  if (setup.num_shards > config.model.n_experts) {
    throw ConfigError("job has " + std::to_string(setup.num_shards) + " expert shards but only " +
                      std::to_string(config.model.n_experts) + " experts per layer");
  }
  if (setup.role == Role::kWorker) return std::make_unique<WorkerRuntime>(setup, std::move(config));
  return std::make_unique<ShardRuntime>(setup, std::move(config));
}

}  // namespace loopmoe::dist
