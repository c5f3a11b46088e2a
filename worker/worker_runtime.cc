// WorkerRuntime: one step, in the order every process meets in collectives, is summarised in
// runtime/runtime_base.h. The worker holds its slice of the global batch and every parameter but
// the experts; its replica gradients are combined over the workers in the pairwise tree.
#include "worker/worker_runtime.h"

#include <algorithm>
#include <filesystem>
#include <limits>
#include <utility>
#include <vector>

#include "comm/gloo_communicator.h"
#include "common/clock.h"
#include "dataloader/dataset_check.h"
#include "dataloader/sampler.h"
#include "dataloader/token_shard.h"
#include "model/error.h"
#include "model/model.h"
#include "model/ops.h"
#include "model/optimizer.h"
#include "model/train_step.h"
#include "runtime/collective_dispatcher.h"
#include "runtime/process_checkpoint.h"
#include "runtime/runtime_base.h"

namespace loopmoe::worker {

namespace {

namespace fs = std::filesystem;
using runtime::checked_config;
using runtime::CheckpointFileRef;
using runtime::Clock;
using runtime::CollectiveDispatcher;
using runtime::gloo_options;
using runtime::ProcessRuntime;
using runtime::ProcessSetup;
using runtime::read_worker_checkpoint;
using runtime::ResumePoint;
using runtime::Role;
using runtime::RuntimeBase;
using runtime::StepReport;
using runtime::sum_of_squares;
using runtime::WorkerCheckpoint;
using runtime::write_worker_checkpoint;

// Vets a dataset file from its header (vocabulary within the model's, at least one window; one
// DataError naming the file, as the trainer and the coordinator's submit check give) and opens it.
dataloader::TokenShard open_checked(const model::Config& config, bool val) {
  dataloader::DatasetNeeds needs;
  needs.max_vocab = static_cast<uint32_t>(config.model.vocab_size);
  needs.seq_len = config.model.seq_len;
  needs.val = val;
  const fs::path dir(config.data.dir);
  dataloader::check_dataset(dir, needs);
  return dataloader::TokenShard::open(dir / (val ? "val.bin" : "train.bin"));
}

class WorkerRuntime final : public RuntimeBase {
 public:
  WorkerRuntime(const ProcessSetup& setup, model::Config config)
      : RuntimeBase(setup, std::move(config)),
        train_shard_(open_checked(config_, /*val=*/false)),
        val_shard_(open_checked(config_, /*val=*/true)),
        model_(config_.model),
        adam_(model_.layout(), config_.train),
        sampler_(train_shard_, config_.train.batch_size, config_.model.seq_len, config_.train.seed,
                 /*shuffle=*/true),
        ranges_(model_.replica_ranges()) {
    const int B = config_.train.batch_size, W = setup.num_workers;
    if (W > B) {
      throw model::ConfigError("job has " + std::to_string(W) +
                               " workers but train.batch_size is " + std::to_string(B) +
                               ": every worker needs at least one sequence");
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

  void discard_batch() override {
    const int T = config_.model.seq_len, B = config_.train.batch_size;
    batch_in_.resize(static_cast<size_t>(B) * T);
    batch_tg_.resize(batch_in_.size());
    sampler_.next(batch_in_.data(), batch_tg_.data());
  }

  StepReport step(int loops) override {
    apply_process_settings();
    const auto t0 = Clock::now();
    const model::TrainConfig& tc = config_.train;
    const int T = config_.model.seq_len, B = tc.batch_size, Bw = row_end_ - row_begin_;
    batch_in_.resize(static_cast<size_t>(B) * T);
    batch_tg_.resize(batch_in_.size());
    sampler_.next(batch_in_.data(), batch_tg_.data());
    const size_t first = static_cast<size_t>(row_begin_) * T;
    dispatcher_->stats() = {};
    // Replica gradients, packed once: each worker's covers its slice, scaled by the global token
    // count; combined over the workers, worker 0's share of the global norm, clipped, unpacked.
    // A non-finite loss on any worker is folded into the reduced norm as NaN (a non-finite
    // gradient anywhere already makes it so), so every process's guard sees the same norm.
    const auto finish = [&](float* g, bool loss_finite) {
      pack(g, packed_);
      if (setup_.poison_grads_for_test) {
        setup_.poison_grads_for_test(steps_done_, packed_.data(), packed_.size());
      }
      if (workers_) combine_replica_grads();
      double share = setup_.rank == 0 ? sum_of_squares(packed_.data(), packed_.size()) : 0.0;
      if (!loss_finite) share = std::numeric_limits<double>::quiet_NaN();
      const auto [norm, coef] = global_clip(share);
      if (coef != 1.f) model::ops::scale_inplace(packed_.data(), packed_.size(), coef);
      unpack(packed_, g);
      return norm;
    };
    const model::StepOutcome outcome = model::train_step(
        model_, adam_, tc, steps_done_,
        {batch_in_.data() + first, batch_tg_.data() + first, Bw, T, loops}, finish, &ranges_);
    const model::LossParts& loss = outcome.loss;
    // Every process sees the same reduced norm: all skip, or all throw here (before the loss
    // all-reduce below, so no worker is left waiting in it).
    const bool skipped = outcome.nonfinite && skip_nonfinite_step(outcome.grad_norm);
    ++steps_done_;

    StepReport r = report(loops, outcome.lr, outcome.grad_norm, dispatcher_->stats(), t0);
    r.skipped = skipped;
    // The cross-entropy sums are integers (ops::LossSum), so adding the workers' gives the single
    // process's sum bit for bit.
    int64_t parts[3] = {loss.ce_sum.units, loss.ce_sum.invalid, loss.dropped};
    if (workers_) workers_->allreduce_sum(parts, 3);
    r.ce = model::ops::LossSum{parts[0], parts[1]}.value() / static_cast<double>(B * T);
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
    r.seconds = common::seconds_since(t0);  // the loss reduction included
    return r;
  }

  double evaluate(int batches) override {
    apply_process_settings();
    const int T = config_.model.seq_len, B = config_.train.batch_size, Bw = row_end_ - row_begin_;
    dataloader::BatchSampler val(val_shard_, B, T, 0, dataloader::WindowOrder::kSpread);
    std::vector<int32_t> in(static_cast<size_t>(B) * T), tg(in.size());
    const size_t first = static_cast<size_t>(row_begin_) * T;
    double total = 0;
    for (int i = 0; i < batches; ++i) {
      val.next(in.data(), tg.data());
      const model::ops::LossSum sum =
          model_.forward(in.data() + first, tg.data() + first, Bw, T).ce_sum;
      int64_t parts[2] = {sum.units, sum.invalid};
      if (workers_) workers_->allreduce_sum(parts, 2);
      total += model::ops::LossSum{parts[0], parts[1]}.value() / static_cast<double>(B * T);
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
    ref.path = checkpoint_path(dir);
    ref.xxh64 = write_worker_checkpoint(ref.path, c, &ref.bytes);
    return ref;
  }

  dataloader::SamplerState sampler_state() const override { return sampler_.state(); }

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
      model::ops::tree_sum_groups(gathered_.data(), n, W, {{0, n}});
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
    if (pick == nullptr)
      throw model::CheckpointError("checkpoint has no worker file to resume from");
    const WorkerCheckpoint c = read_worker_checkpoint(pick->path, pick->xxh64);
    if (c.params.size() != replica_size_) {
      throw model::CheckpointError(pick->path + ": holds " + std::to_string(c.params.size()) +
                                   " replica parameters, this model has " +
                                   std::to_string(replica_size_));
    }
    check_resume_file(c.config_hash, c.step, resume.step, pick->path);
    unpack(c.params, model_.params());
    unpack(c.m, adam_.m().data());
    unpack(c.v, adam_.v().data());
    adam_.set_steps_taken(c.adam_steps);
    sampler_.restore(c.sampler);
    steps_done_ = c.step;
  }

  dataloader::TokenShard train_shard_, val_shard_;
  model::Model model_;
  model::AdamW adam_;
  dataloader::BatchSampler sampler_;
  const std::vector<std::pair<size_t, size_t>>& ranges_;  // the model's replica ranges
  size_t replica_size_ = 0;
  int row_begin_ = 0, row_end_ = 0;  // this worker's rows of the global batch
  std::unique_ptr<comm::Communicator> workers_;
  std::unique_ptr<CollectiveDispatcher> dispatcher_;
  std::vector<int32_t> batch_in_, batch_tg_;
  std::vector<float> packed_, gathered_;
};

}  // namespace

std::unique_ptr<ProcessRuntime> create_worker_runtime(const ProcessSetup& setup) {
  model::Config config = checked_config(setup, Role::kWorker);
  return std::make_unique<WorkerRuntime>(setup, std::move(config));
}

}  // namespace loopmoe::worker
