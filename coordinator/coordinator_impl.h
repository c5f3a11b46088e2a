// PRIVATE to coordinator/: the Coordinator's implementation class, shared by the .cc files that
// implement it (RocksDB-style): coordinator.cc (construction, restart requeue, shutdown),
// rpc_handlers.cc (the Coordinator gRPC service methods) and scheduler.cc (the scheduler thread,
// which starts a JobDriver thread per running job). Nothing outside coordinator/ includes it; the
// public API is coordinator.h.
#pragma once

#include <absl/base/thread_annotations.h>
#include <absl/synchronization/mutex.h>
#include <grpcpp/grpcpp.h>

#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>

#include "coordinator/coordinator.h"
#include "coordinator/job_driver.h"
#include "coordinator/job_store.h"
#include "coordinator/metrics.h"
#include "coordinator/process_registry.h"
#include "coordinator/rendezvous_kv.h"
#include "proto/loopmoe.grpc.pb.h"
#include "security/health_server.h"

namespace loopmoe::coordinator {

// A job being driven: its driver and the thread running it.
struct RunningJob {
  std::unique_ptr<JobDriver> driver;
  std::thread thread;
};

class Coordinator::Impl final : public v1::Coordinator::Service {
 public:
  explicit Impl(const CoordinatorOptions& options);
  ~Impl() override { shutdown(); }

  void shutdown() ABSL_LOCKS_EXCLUDED(mu_);

  // ---- Coordinator service (rpc_handlers.cc)
  grpc::Status SubmitJob(grpc::ServerContext*, const v1::SubmitJobRequest* request,
                         v1::SubmitJobResponse* response) override;
  grpc::Status GetJob(grpc::ServerContext*, const v1::GetJobRequest* request,
                      v1::JobStatus* response) override;
  grpc::Status ListJobs(grpc::ServerContext*, const v1::ListJobsRequest*,
                        v1::ListJobsResponse* response) override;
  grpc::Status CancelJob(grpc::ServerContext*, const v1::CancelJobRequest* request,
                         v1::JobStatus* response) override;
  grpc::Status WatchJob(grpc::ServerContext* context, const v1::WatchJobRequest* request,
                        grpc::ServerWriter<v1::LogLine>* writer) override;
  grpc::Status ListCheckpoints(grpc::ServerContext*, const v1::ListCheckpointsRequest* request,
                               v1::ListCheckpointsResponse* response) override;
  grpc::Status Register(grpc::ServerContext*, const v1::RegisterRequest* request,
                        v1::RegisterResponse* response) override;
  grpc::Status Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest* request,
                         v1::HeartbeatResponse* response) override;
  grpc::Status KvSet(grpc::ServerContext*, const v1::KvSetRequest* request,
                     v1::KvSetResponse*) override;
  grpc::Status KvGet(grpc::ServerContext*, const v1::KvGetRequest* request,
                     v1::KvGetResponse* response) override;
  grpc::Status KvWait(grpc::ServerContext*, const v1::KvWaitRequest* request,
                      v1::KvWaitResponse* response) override;

  CoordinatorOptions options_;
  std::string address_;
  std::string data_dir_;  // absolute
  JobStore store_;
  RendezvousKv kv_;
  ProcessRegistry registry_;
  CoordinatorMetrics metrics_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<security::HealthServer> health_;  // options_.health_listen; null without

 private:
  // ---- jobs (coordinator.cc)
  void requeue_after_restart() ABSL_LOCKS_EXCLUDED(mu_);
  void log(const std::string& job_id, const std::string& text);

  // ---- scheduler (scheduler.cc)
  void scheduler_loop() ABSL_LOCKS_EXCLUDED(mu_);
  void schedule_locked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void reap_finished_locked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::Mutex mu_;
  // Job state, logs, processes: wakes the scheduler and watchers. A CondVar, not mu_.Await: log
  // lines and registrations change state outside mu_.
  absl::CondVar changed_;
  std::set<int64_t> queue_ ABSL_GUARDED_BY(mu_);  // QUEUED jobs, FIFO = id order
  std::map<std::string, std::unique_ptr<RunningJob>> running_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  std::thread scheduler_;  // started by the constructor, joined by shutdown()
};

}  // namespace loopmoe::coordinator
