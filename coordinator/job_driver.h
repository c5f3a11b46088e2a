// The job driver: drives one run (epoch) of one job on the training processes the scheduler
// assigned to it, step chunk by step chunk (docs/SERVICE.md): Configure (resuming from the
// requested or latest committed checkpoint), RunSteps, Evaluate and Checkpoint as the job's
// intervals fall due, and the commit rule (a checkpoint counts once every process has written its
// file and its metadata is in the job store). A failed run is requeued with epoch + 1 (or fails
// the job once out of restarts); a cancelled job stops between chunks. It is its own class, with
// the job store, process registry and metrics passed in explicitly, so that it can be tested
// without a Coordinator server (tests/coordinator/test_job_driver.cc).
#pragma once

#include <absl/base/thread_annotations.h>
#include <absl/synchronization/mutex.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "coordinator/coordinator.h"
#include "coordinator/job_store.h"
#include "coordinator/metrics.h"
#include "coordinator/process_registry.h"
#include "proto/loopmoe.grpc.pb.h"

namespace loopmoe::coordinator {

// One assigned process, as the driver talks to it.
struct Member {
  std::string id;
  v1::Role role = v1::WORKER;
  int rank = 0;
  std::string address;
  std::unique_ptr<v1::TrainingProcess::Stub> stub;
  std::string label() const;  // "worker-1 (worker 0 at 127.0.0.1:4242)"
};

// A member with its own channel to `address` (256 MiB messages), secured by `credentials` (TLS and
// the process token; plaintext when they are Credentials::Insecure()).
Member make_member(const std::string& id, v1::Role role, int rank, const std::string& address,
                   const security::Credentials& credentials);

// What a driver shares with whoever runs it (the Coordinator, or a test).
struct DriverHost {
  // The coordinator's mutex: serializes the driver's read-modify-writes of the job record with
  // CancelJob and the scheduler; requeue and the driver's finished flag are set under it.
  absl::Mutex* mu = nullptr;
  // Signalled after every change of the job record, every log line and the end of run(): wakes
  // the scheduler and WatchJob.
  absl::CondVar* changed = nullptr;
  // A failed run was requeued (the record is QUEUED with epoch + 1): queue the job again. Called
  // with *mu held.
  std::function<void(const std::string& job_id)> requeue;
};

class JobDriver {
 public:
  // `members`: workers by rank, then shards by rank, all assigned to `job_id` in `registry`; the
  // job record is in `store` (normally STARTING). `data_dir` (absolute) holds jobs/<id> for jobs
  // without an output_dir. Nothing happens until run().
  JobDriver(const CoordinatorOptions& options, std::string data_dir, JobStore& store,
            ProcessRegistry& registry, CoordinatorMetrics& metrics, DriverHost host,
            std::string job_id, std::vector<Member> members);
  JobDriver(const JobDriver&) = delete;
  JobDriver& operator=(const JobDriver&) = delete;

  // Drives the run to its end: the job SUCCEEDED, FAILED, requeued (host.requeue) or cancelled,
  // or left as it is in the store when stop() was called. Tells the members to leave the job
  // (Shutdown, best effort; not those found unreachable, which leave the registry), releases them
  // in the registry and sets finished(). An error of the coordinator itself (the job store) fails
  // the job as an internal error.
  void run();

  // CancelJob: stop after the current step chunk (the job record is CANCELLED by the caller).
  void cancel() { cancel_ = true; }
  // Coordinator shutdown: cancels the calls in flight (and any made later); run() returns leaving
  // the job as it is in the store (it is requeued by the next start). Idempotent.
  void stop() ABSL_LOCKS_EXCLUDED(mu_);

  bool finished() const { return finished_; }
  const std::string& job_id() const { return job_id_; }
  const std::vector<Member>& members() const { return members_; }

 private:
  void drive_run();
  // train.nonfinite = "rollback": records the failed 0-based `step` in the job (every later run
  // drops it: RunStepsRequest.drop_steps), then throws RunFailure, so the job restarts from its
  // latest committed checkpoint like after any run failure, or PermanentFailure after more than
  // 10 rollbacks.
  [[noreturn]] void roll_back(int64_t step, const std::string& what, int total_steps);
  // Where this run starts: the committed checkpoint spec.resume_step() names, else the latest one
  // (of this job, or, until it has committed its own, of spec.resume_from_job(), which sets
  // *other_job), else step 0 (an empty CheckpointMeta). Throws PermanentFailure for a
  // resume_step that was never committed.
  v1::CheckpointMeta resume_point(const v1::JobSpec& spec, bool* other_job);
  // Calls `call(member, context)` on every member concurrently, each with `timeout`; the first
  // failure cancels the others. Throws RunFailure/Stopping; returns when all succeeded.
  void call_all(const char* rpc, std::chrono::milliseconds timeout,
                const std::function<grpc::Status(Member&, grpc::ClientContext*)>& call)
      ABSL_LOCKS_EXCLUDED(mu_);
  void cancel_calls() ABSL_LOCKS_EXCLUDED(mu_);
  void check_interrupts();
  void shutdown_members(const std::set<std::string>& skip);
  v1::CheckpointMeta checkpoint(const v1::JobStatus& job, const std::string& output_dir,
                                int64_t step);
  // Reads the job, applies `change` (which may return false to leave it untouched, e.g. when it
  // was cancelled meanwhile), stamps updated_unix_ms and writes it. Returns whether it was written.
  bool update_job(const std::function<bool(v1::JobStatus&)>& change);
  void log(const std::string& text);

  const CoordinatorOptions options_;
  const std::string data_dir_;
  JobStore& store_;
  ProcessRegistry& registry_;
  CoordinatorMetrics& metrics_;
  DriverHost host_;
  const std::string job_id_;
  std::vector<Member> members_;
  // Lone flags, set once and polled, so atomics need no mutex.
  std::atomic<bool> cancel_{false};    // cancel(): checked between chunks
  std::atomic<bool> stopping_{false};  // stop(): coordinator shutdown
  // Set under *host_.mu as run()'s last act, so that the scheduler, which checks it under that
  // mutex before waiting on host_.changed, cannot miss the wake-up; atomic for finished() callers
  // without the mutex (tests).
  std::atomic<bool> finished_{false};
  absl::Mutex mu_;
  std::set<grpc::ClientContext*> active_ ABSL_GUARDED_BY(mu_);  // the calls in flight
};

}  // namespace loopmoe::coordinator
