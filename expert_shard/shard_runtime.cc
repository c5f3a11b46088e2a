// ShardRuntime: the expert shard's side of a step (runtime/runtime_base.h has the order in
// which the processes meet): serve every MoE application forward and backward in the workers'
// order, take part in the global clipping all-reduce, step AdamW over the owned experts.
#include "expert_shard/shard_runtime.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "expert_shard/shard_experts.h"
#include "model/error.h"
#include "model/model.h"
#include "model/ops.h"
#include "model/optimizer.h"
#include "model/param_layout.h"
#include "runtime/process_checkpoint.h"
#include "runtime/runtime_base.h"

namespace loopmoe::expert_shard {

namespace {

using runtime::checked_config;
using runtime::CheckpointFileRef;
using runtime::Clock;
using runtime::ExpertPartition;
using runtime::ProcessRuntime;
using runtime::ProcessSetup;
using runtime::read_shard_checkpoint;
using runtime::ResumePoint;
using runtime::Role;
using runtime::RuntimeBase;
using runtime::ShardCheckpoint;
using runtime::StepReport;
using runtime::sum_of_squares;
using runtime::write_shard_checkpoint;

class ShardRuntime final : public RuntimeBase {
 public:
  ShardRuntime(const ProcessSetup& setup, model::Config config)
      : RuntimeBase(setup, std::move(config)) {
    connect_world();
    experts_ = std::make_unique<ShardExperts>(*world_, setup.num_workers, setup.rank, partition_,
                                              config_.model);
    adam_ = std::make_unique<model::AdamW>(std::vector<uint8_t>(experts_->num_params(), 1),
                                           config_.train);
    init_from_model();
    if (setup.resume) load(*setup.resume);
  }

  StepReport step(int loops) override {
    apply_process_settings();
    const auto t0 = Clock::now();
    const int N = config_.model.n_layers, A = N * loops;
    experts_->stats() = {};
    experts_->zero_grad();
    for (int a = 0; a < A; ++a) experts_->serve_forward(a, a % N);
    for (int a = A - 1; a >= 0; --a) experts_->serve_backward(a, a % N);
    float* g = experts_->grads();
    const size_t n = experts_->num_params();
    if (setup_.poison_grads_for_test) setup_.poison_grads_for_test(steps_done_, g, n);
    const auto [norm, coef] = global_clip(sum_of_squares(g, n));
    const double lr = model::learning_rate(config_.train, static_cast<int>(steps_done_));
    // The numerics guard, on the norm every process reduced (the workers fold a non-finite loss
    // into it): the same decision as theirs, before AdamW.
    const bool skipped = skip_nonfinite_step(norm);
    if (!skipped) {
      if (coef != 1.f) model::ops::scale_inplace(g, n, coef);
      adam_->step(experts_->params(), g, lr);
    }
    ++steps_done_;
    StepReport r = report(loops, lr, norm, experts_->stats(), t0);
    r.skipped = skipped;
    return r;
  }

  double evaluate(int batches) override {
    apply_process_settings();
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
    ref.path = checkpoint_path(dir);
    ref.xxh64 = write_shard_checkpoint(ref.path, c, &ref.bytes);
    return ref;
  }

  dataloader::SamplerState sampler_state() const override { return {}; }

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
    const model::ParamLayout layout(config_.model);
    const size_t DF = static_cast<size_t>(config_.model.d_model) * config_.model.expert_hidden;
    const size_t first = static_cast<size_t>(experts_->first_expert());
    float* p = experts_->params();
    model::visit_initial_params(config_.model, layout, config_.train.seed, model::is_expert_tensor,
                                [&](const model::ParamTensor& t, const float* values) {
                                  for (int n = 0; n < experts_->num_layers(); ++n) {
                                    const model::LayerOffsets& l = layout.layers[n];
                                    for (int i = 0; i < experts_->num_local_experts(); ++i) {
                                      const float* src =
                                          values + (first + static_cast<size_t>(i)) * DF;
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
        throw model::CheckpointError(f.path + ": expert shapes differ from this job's model");
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
        throw model::CheckpointError("checkpoint at step " + std::to_string(resume.step) +
                                     " has no file holding expert " + std::to_string(e) +
                                     " of layer " + std::to_string(n));
      }
    }
    adam_->set_steps_taken(adam_steps);
    steps_done_ = resume.step;
  }

  std::unique_ptr<ShardExperts> experts_;
  std::unique_ptr<model::AdamW> adam_;
};

}  // namespace

std::unique_ptr<ProcessRuntime> create_shard_runtime(const ProcessSetup& setup) {
  model::Config config = checked_config(setup, Role::kExpertShard);
  return std::make_unique<ShardRuntime>(setup, std::move(config));
}

}  // namespace loopmoe::expert_shard
