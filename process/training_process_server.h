// The TrainingProcess gRPC service of one worker or expert shard: turns the coordinator's
// Configure / RunSteps / Evaluate / Checkpoint / Shutdown calls into runtime::ProcessRuntime calls.
//
// States: idle -> (Configure) in a job -> (Shutdown, or a communication failure) idle. The
// runtime is not thread-safe, so RPCs are served one at a time; a Configure that is still
// rendezvousing delays the others (the coordinator drives one job's processes in lock step anyway).
//
// Status codes:
//   INVALID_ARGUMENT     malformed request, or the runtime's ConfigError (bad config)
//   FAILED_PRECONDITION  wrong state: role mismatch, already in a job, not in this job,
//                        first_step / checkpoint step does not follow the runtime's step
//   UNAVAILABLE          a communication failure (comm::CommError); the runtime is dropped and
//                        the process is idle again, ready for the job's restart
//   DEADLINE_EXCEEDED    the same for comm::TimeoutError (a peer or the rendezvous timed out)
//   INTERNAL             anything else the runtime threw (e.g. unreadable data); the runtime is
//                        kept, the coordinator decides (Shutdown)
// Messages always say which process and job (e.g. "worker 1 of job j-3: ...").
#pragma once

#include <absl/base/thread_annotations.h>
#include <absl/synchronization/mutex.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "comm/key_value_store.h"
#include "process/process_metrics.h"
#include "proto/loopmoe.grpc.pb.h"
#include "runtime/process_runtime.h"

namespace loopmoe::process {

using RuntimeFactory =
    std::function<std::unique_ptr<runtime::ProcessRuntime>(const runtime::ProcessSetup&)>;

struct TrainingProcessOptions {
  runtime::Role role = runtime::Role::kWorker;
  RuntimeFactory factory;
  // The coordinator's store (a CoordinatorStore in the service); each job run sees it through a
  // NamespacedStore with the request's rendezvous_prefix. Not owned; must outlive the server.
  comm::KeyValueStore* rendezvous_store = nullptr;
  std::string hostname = "127.0.0.1";  // passed to the runtime: the address Gloo listens on
  std::chrono::milliseconds collective_timeout{60000};
  std::chrono::milliseconds rendezvous_timeout{120000};
  ProcessMetrics* metrics = nullptr;  // optional; not owned
  // Called once a Shutdown with exit = true has been handled; the reply is sent after the
  // handler returns, so this must only request the exit (e.g. wake the main thread), not do it.
  std::function<void()> request_exit;
};

class TrainingProcessServer final : public loopmoe::v1::TrainingProcess::Service {
 public:
  explicit TrainingProcessServer(TrainingProcessOptions options);
  ~TrainingProcessServer() override;

  grpc::Status Configure(grpc::ServerContext* context, const loopmoe::v1::ConfigureRequest* request,
                         loopmoe::v1::ConfigureResponse* response) override;
  grpc::Status RunSteps(grpc::ServerContext* context, const loopmoe::v1::RunStepsRequest* request,
                        loopmoe::v1::RunStepsResponse* response) override;
  grpc::Status Evaluate(grpc::ServerContext* context, const loopmoe::v1::EvaluateRequest* request,
                        loopmoe::v1::EvaluateResponse* response) override;
  grpc::Status Checkpoint(grpc::ServerContext* context,
                          const loopmoe::v1::CheckpointRequest* request,
                          loopmoe::v1::CheckpointResponse* response) override;
  grpc::Status Shutdown(grpc::ServerContext* context, const loopmoe::v1::ShutdownRequest* request,
                        loopmoe::v1::ShutdownResponse* response) override;

  // For tests and logs: the job this process is in, if any.
  std::optional<std::string> current_job() const ABSL_LOCKS_EXCLUDED(mutex_);

 private:
  struct Job;

  grpc::Status check_job_locked(const std::string& job_id, const char* rpc) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  // Maps an exception from the runtime to a status; drops the runtime on a comm error.
  grpc::Status runtime_failure_locked(const std::string& who, const std::string& what,
                                      std::exception_ptr error)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  void leave_job_locked(const char* why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  std::string who_locked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);

  const TrainingProcessOptions options_;
  mutable absl::Mutex mutex_;  // serialises RPCs: the runtime is not thread-safe
  std::unique_ptr<Job> job_ ABSL_GUARDED_BY(mutex_) ABSL_PT_GUARDED_BY(mutex_);
};

}  // namespace loopmoe::process
