// What `loopmoe-worker` and `loopmoe-expert-shard` run: a TrainingProcess gRPC server (with
// grpc.health.v1), optional Prometheus metrics, registration with the coordinator and a heartbeat
// thread. The training itself is behind the injected RuntimeFactory (runtime::create_runtime in the
// executables, a fake in tests).
#pragma once

#include <absl/base/thread_annotations.h>
#include <absl/synchronization/mutex.h>
#include <absl/time/time.h>
#include <grpcpp/server.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "process/coordinator_store.h"
#include "process/process_metrics.h"
#include "process/training_process_server.h"
#include "security/credentials.h"
#include "security/health_server.h"

namespace loopmoe::process {

struct ProcessOptions {
  runtime::Role role = runtime::Role::kWorker;
  std::string coordinator;             // host:port of the Coordinator service
  std::string listen = "127.0.0.1:0";  // TrainingProcess server; port 0 picks a free one
  std::string metrics_listen;          // Prometheus /metrics; empty = none
  std::string health_listen;           // plaintext grpc.health.v1 only (probes); empty = none
  std::string hostname = "127.0.0.1";  // advertised for RPC and Gloo
  std::string name;                    // for humans; empty = <hostname>/<pid>
  std::chrono::milliseconds connect_timeout{30000};
  std::chrono::milliseconds collective_timeout{60000};
  std::chrono::milliseconds rendezvous_timeout{120000};
  // TLS and the process token, for this process's server (which accepts the process token only)
  // and its calls to the coordinator (docs/SERVICE.md "Security"). The default (no certificate)
  // does not start; --insecure and tests that need no security set Credentials::Insecure().
  security::Credentials security;
};

// The servers and coordinator session of one process, usable in-process (tests) or from
// process_main. Not copyable; stop() (or the destructor) tears everything down.
class ProcessHost {
 public:
  ProcessHost(ProcessOptions options, RuntimeFactory factory);
  ~ProcessHost();
  ProcessHost(const ProcessHost&) = delete;
  ProcessHost& operator=(const ProcessHost&) = delete;

  // Starts the servers, registers with the coordinator (retrying until connect_timeout) and starts
  // heartbeats. Throws std::runtime_error with one clear line (e.g. the coordinator is
  // unreachable, or the address cannot be bound).
  void start() ABSL_LOCKS_EXCLUDED(mutex_);
  // Stops heartbeats and the servers, waiting up to `grace` for running RPCs. Idempotent.
  void stop(std::chrono::milliseconds grace = std::chrono::seconds(5)) ABSL_LOCKS_EXCLUDED(mutex_);

  // Advertised addresses: hostname and the bound port.
  const std::string& address() const { return address_; }
  const std::string& metrics_address() const { return metrics_address_; }
  std::string process_id() const ABSL_LOCKS_EXCLUDED(mutex_);
  ProcessMetrics& metrics() { return metrics_; }

  // True once a Shutdown RPC asked the process to exit; waits up to `timeout` for it.
  bool wait_for_exit_request(std::chrono::milliseconds timeout) ABSL_LOCKS_EXCLUDED(mutex_);

 private:
  // One Register call; on success stores the id and interval. Returns the failure status.
  grpc::Status register_once(absl::Duration timeout) ABSL_LOCKS_EXCLUDED(mutex_);
  void heartbeat_loop() ABSL_LOCKS_EXCLUDED(mutex_);

  const ProcessOptions options_;
  const RuntimeFactory factory_;
  ProcessMetrics metrics_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<loopmoe::v1::Coordinator::Stub> coordinator_;
  std::unique_ptr<CoordinatorStore> store_;
  std::unique_ptr<TrainingProcessServer> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<security::HealthServer> health_;
  std::string address_;
  std::string metrics_address_;

  // Waiters sleep in mutex_.Await: the flags below change only under mutex_, which re-checks them.
  mutable absl::Mutex mutex_;
  std::string process_id_ ABSL_GUARDED_BY(mutex_);
  absl::Duration heartbeat_interval_ ABSL_GUARDED_BY(mutex_) = absl::Seconds(1);
  bool exit_requested_ ABSL_GUARDED_BY(mutex_) = false;
  bool stopping_ ABSL_GUARDED_BY(mutex_) = false;
  std::thread heartbeat_thread_;  // started by start(), joined by stop()
};

// Parses the command line (--help lists the flags), runs a ProcessHost until SIGINT / SIGTERM or
// a Shutdown with exit, and returns the process exit code: 0 after a clean shutdown, 1 with one
// `error:` line on stderr when it cannot start. Call first thing in main(): it blocks SIGINT and
// SIGTERM before any thread exists, to receive them synchronously.
int process_main(runtime::Role role, int argc, char** argv, RuntimeFactory factory);

}  // namespace loopmoe::process
