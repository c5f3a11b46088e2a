// What the worker's and the expert shard's runtimes share (private to runtime/, worker/ and
// expert_shard/): the setup checks every process makes before it builds anything, the world
// communicator, the global clipping all-reduce, the step report fields both roles fill, and the
// resume-file checks. The step itself is each role's (worker/worker_runtime.cc,
// expert_shard/shard_runtime.cc); both start with the same one-line summary of the order in which
// the processes meet in collectives:
//   workers: sample the global batch, keep their slice; forward (per MoE application: router
//            statistics all-reduced among workers, dispatch/combine with the shards); backward
//            (the mirror image); replica gradients all-reduced among workers;
//   all:     squared gradient norms all-reduced over the world (worker 0's replica + every
//            shard's experts) → one global clipping coefficient; each process steps its AdamW;
//   workers: loss parts all-reduced among workers.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "comm/communicator.h"
#include "comm/gloo_communicator.h"
#include "common/clock.h"
#include "model/config.h"
#include "runtime/comm_stats.h"
#include "runtime/expert_partition.h"
#include "runtime/process_runtime.h"

namespace loopmoe::runtime {

using Clock = std::chrono::steady_clock;

// Checks the setup (store, counts, rank within the role) and parses its config; throws
// ConfigError naming what is wrong. `role` is the runtime being built: a worker runtime refuses a
// shard's setup and the other way round.
model::Config checked_config(const ProcessSetup& setup, Role role);

// The checkpoint file name of a process: worker-<rank>.bin / shard-<rank>.bin.
std::string checkpoint_file_name(Role role, int rank);

comm::GlooOptions gloo_options(const ProcessSetup& setup, const char* group);

// Sum of squares in double of g[0, n), in the order clip_grad_norm takes it.
double sum_of_squares(const float* g, size_t n);

class RuntimeBase : public ProcessRuntime {
 public:
  RuntimeBase(const ProcessSetup& setup, model::Config config);
  Role role() const override { return setup_.role; }
  int rank() const override { return setup_.rank; }
  int64_t steps_done() const override { return steps_done_; }
  StepReport drop_step(int loops) override;

 protected:
  // drop_step's part that depends on the role: a worker draws the step's batch and discards it,
  // so that the data position moves on as in a computed step.
  virtual void discard_batch() {}
  // The job's process-wide settings, made again at every step and evaluation (the thread tests
  // run several processes' runtimes in one process): the thread count, and train.precision for
  // the matrix products (model/ops.h MatmulPrecision; bf16 on the CPU is batch-invariant too, so
  // workers and shards still reproduce the single-process run).
  void apply_process_settings() const;
  int world_rank() const {
    return setup_.role == Role::kWorker ? setup_.rank : setup_.num_workers + setup_.rank;
  }
  void connect_world();
  // Global gradient norm from this process's share of the squared norm; the clipping coefficient
  // (1 when not clipping), as clip_grad_norm computes it in one process.
  std::pair<double, float> global_clip(double local_sum_of_squares);
  // The numerics guard of a step whose reduced gradient norm is `norm` (train.nonfinite; the
  // worker folds a non-finite loss into the norm, so every process decides alike). Finite: false.
  // Not finite: AdamW was not called; "skip" returns true; "stop" throws PolicyStop (the
  // coordinator fails the job) and "rollback" PolicyRollback (it restarts the job from its last
  // checkpoint, the replay dropping this step; docs/SERVICE.md "Numerics guard"), naming the step.
  bool skip_nonfinite_step(double norm);
  // The parts of a step report both roles fill alike.
  StepReport report(int loops, double lr, double grad_norm, const AllToAllStats& a2a,
                    Clock::time_point t0) const;
  // A checkpoint file must be of this job's config and of the step the metadata names.
  void check_resume_file(uint64_t hash, int64_t step, int64_t want_step,
                         const std::string& path) const;
  // Where this process's checkpoint file for `dir` goes (absolute).
  std::string checkpoint_path(const std::string& dir) const;

  ProcessSetup setup_;
  model::Config config_;
  uint64_t config_hash_;
  ExpertPartition partition_;
  std::unique_ptr<comm::Communicator> world_;
  int64_t steps_done_ = 0;
};

}  // namespace loopmoe::runtime
