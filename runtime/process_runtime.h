// What a training process of the distributed service runs, behind its gRPC server: one worker
// (embedding, attention, IterAdaLN, router, head; data parallel) or one expert shard (the experts
// with global ids in its range, for every unique layer; expert parallel). The gRPC layer
// (process/) turns RPCs into these calls; this layer knows nothing of gRPC.
//
// All processes of a job call step(), evaluate() and checkpoint() in the same order with the same
// arguments: they meet in collectives (Gloo) inside them. A peer that dies turns into a
// comm::CommError/TimeoutError after the communicator's timeout, never a hang.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "comm/key_value_store.h"
#include "dataloader/sampler.h"

namespace loopmoe::runtime {

enum class Role { kWorker, kExpertShard };
// For messages: "worker" / "expert shard". Inline, so the process servers' tests need no runtime.
inline const char* to_string(Role role) {
  return role == Role::kWorker ? "worker" : "expert shard";
}

// The job's own numerics policy stopped it (train.nonfinite = "stop"): a restart would meet the
// same numbers again, so the process server answers ABORTED and the coordinator fails the job
// instead of restarting it.
struct PolicyStop : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The numerics guard's "rollback" (train.nonfinite = "rollback"): step `step` (0-based) had a NaN
// or Inf loss or reduced gradient norm, no process stepped AdamW, and the job must go back to its
// last committed checkpoint and replay, dropping this step's batch (drop_step). A PolicyStop
// (ABORTED) whose step reaches the coordinator in the status details (loopmoe.v1.RunFailure):
// the coordinator records it in the job and restarts it instead of failing it.
struct PolicyRollback : PolicyStop {
  PolicyRollback(const std::string& what, int64_t step) : PolicyStop(what), step(step) {}
  int64_t step;
};

// One file of a checkpoint: a worker's replica (non-expert parameters and AdamW state) or a shard's
// experts (keyed by global expert id, so a job can resume onto a different number of shards).
struct CheckpointFileRef {
  Role role = Role::kWorker;
  int rank = 0;      // within the role
  std::string path;  // absolute
  uint64_t xxh64 = 0;
  int64_t bytes = 0;
};

// A committed checkpoint to continue from.
struct ResumePoint {
  int64_t step = 0;                      // steps completed
  std::vector<CheckpointFileRef> files;  // all files of the checkpoint, any shard count
  dataloader::SamplerState sampler;
};

struct ProcessSetup {
  std::string job_id;
  int64_t epoch = 0;
  Role role = Role::kWorker;
  int rank = 0;  // within the role: workers 0..W-1, shards 0..S-1
  int num_workers = 1;
  int num_shards = 1;
  std::string config_toml;  // full training config; parsed and validated by create_runtime
  int threads = 1;
  std::optional<ResumePoint> resume;
  // Rendezvous store already namespaced for this job run (job/<id>/epoch/<n>/); used only inside
  // create_runtime. Not owned.
  comm::KeyValueStore* store = nullptr;
  std::string hostname = "127.0.0.1";  // address Gloo listens on
  std::chrono::milliseconds collective_timeout{60000};
  std::chrono::milliseconds rendezvous_timeout{120000};
  // Test hook (tests/cluster, the numerics guard): called with the 0-based step and this
  // process's own gradients (a worker's packed replica gradients before they are combined, a
  // shard's expert gradients) before the global norm, e.g. to poison one with NaN. In-process
  // only; never set by the service.
  std::function<void(int64_t step, float* grads, size_t n)> poison_grads_for_test;
};

// One training step as this process saw it (mirrors loopmoe.v1.StepReport).
struct StepReport {
  int64_t step = 0;  // steps completed after this one
  int loops = 0;
  double loss = 0, ce = 0, aux = 0, z = 0;  // global batch; workers only (0 on shards)
  int64_t dropped = 0;                      // global, workers only
  double lr = 0, grad_norm = 0;
  double seconds = 0;
  int64_t alltoall_bytes = 0;  // sent by this process
  double alltoall_seconds = 0;
  int num_experts = 0;
  std::vector<int64_t> expert_tokens;  // [applications][experts] global, after drops; worker 0
  int64_t tokens = 0;                  // global tokens in the step
  // The numerics guard skipped the step (train.nonfinite = "skip"): its loss or reduced gradient
  // norm was NaN or Inf, and no process stepped AdamW.
  bool skipped = false;
};

class ProcessRuntime {
 public:
  virtual ~ProcessRuntime() = default;
  virtual Role role() const = 0;
  virtual int rank() const = 0;
  // Steps completed (the resume step right after creation).
  virtual int64_t steps_done() const = 0;
  // One training step with `loops` iterations of the looped block (every process the same).
  virtual StepReport step(int loops) = 0;
  // The next step without computing it: a worker draws and discards its batch, nothing is
  // communicated, no parameter or AdamW state changes, and the report is `skipped` with a NaN
  // loss and gradient norm. The replay of a step that failed under train.nonfinite = "rollback"
  // (the coordinator names it to every process alike, so none waits for another).
  virtual StepReport drop_step(int loops) = 0;
  // Mean validation cross-entropy over `batches` batches from the start of val.bin, at the
  // config's loop count. Workers return it; shards take part and return 0.
  virtual double evaluate(int batches) = 0;
  // Writes this process's checkpoint file for the current step into `dir` (created if missing),
  // fsyncs it and returns where it is and its checksum.
  virtual CheckpointFileRef checkpoint(const std::string& dir) = 0;
  // Data-loader position (workers; shards return a default state).
  virtual dataloader::SamplerState sampler_state() const = 0;
};

// Built by create_runtime (runtime/create_runtime.h) or, in the role's executable, by
// worker::create_worker_runtime / expert_shard::create_shard_runtime.

}  // namespace loopmoe::runtime
