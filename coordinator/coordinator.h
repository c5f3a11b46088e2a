// The coordinator of the LoopMoE training service (docs/SERVICE.md): the Coordinator gRPC service
// (jobs, logs, checkpoints, process registry, rendezvous KV), the FIFO scheduler and one driver
// thread per running job, which drives its training processes step chunk by step chunk. It never
// sits in the per-layer data path.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "security/credentials.h"

namespace loopmoe::coordinator {

struct CoordinatorOptions {
  std::string listen = "127.0.0.1:7070";           // port 0: any free port (see address())
  std::string data_dir = "./loopmoe-coordinator";  // RocksDB in <data_dir>/db, jobs in /jobs
  std::string metrics_listen;                      // empty: no /metrics
  std::chrono::milliseconds heartbeat_timeout{10000};
  int max_restarts = 3;
  // Deadlines of the calls to training processes.
  std::chrono::milliseconds configure_timeout{10 * 60 * 1000};
  std::chrono::milliseconds step_timeout{30 * 60 * 1000};  // RunSteps, Evaluate, Checkpoint
  std::chrono::milliseconds shutdown_timeout{5000};        // best-effort Shutdown
  int64_t max_chunk_steps = 50;
  // SubmitJob refuses a job whose dataset would fail it (check_job_data: shards missing, vocab
  // too large, fewer tokens than one window). Off only for a coordinator that cannot see the
  // workers' data.dir (or tests with fake processes that read none).
  bool check_data = true;
  // TLS and tokens of the server and of the calls to the training processes (docs/SERVICE.md
  // "Security"). The default (no certificate) does not start; --insecure and the tests that need
  // no security set security::Credentials::Insecure().
  security::Credentials security;
  // Jobs write only under this directory: SubmitJob refuses an output_dir that is not under it
  // once normalised and its symlinks resolved (INVALID_ARGUMENT). Empty: <data_dir>/jobs.
  std::string data_root;
  // Also serve plaintext grpc.health.v1 (and nothing else) here, for probes that cannot speak
  // TLS (Kubernetes). Empty: none.
  std::string health_listen;
};

class Coordinator {
 public:
  // Opens the job store, requeues jobs that were running when the coordinator stopped (epoch + 1),
  // starts the gRPC server (with grpc.health.v1 SERVING), the metrics exposer and the scheduler.
  // Throws std::runtime_error with one clear message (unopenable database, address in use).
  explicit Coordinator(const CoordinatorOptions& options);
  // shutdown().
  ~Coordinator();
  Coordinator(const Coordinator&) = delete;
  Coordinator& operator=(const Coordinator&) = delete;

  // "host:port" the server listens on.
  const std::string& address() const;
  // "host:port" of /metrics, empty when not serving metrics.
  std::string metrics_address() const;
  // "host:port" of the plaintext health server, empty when there is none.
  std::string health_address() const;

  // Stops the server, cancels the drivers' calls (running jobs stay RUNNING in the store and are
  // requeued by the next start) and closes the database. Idempotent.
  void shutdown();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace loopmoe::coordinator
