// Prometheus metrics of the coordinator (names: docs/SERVICE.md), served by a pull Exposer when a
// listen address is given, together with the standard process_* series of the Prometheus client
// libraries (CPU, memory, threads, file descriptors; common/process_stats.h), read from /proc at
// each scrape. Thread-safe.
#pragma once

#include <absl/base/thread_annotations.h>
#include <absl/synchronization/mutex.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "coordinator/process_registry.h"
#include "proto/loopmoe.pb.h"

namespace prometheus {
class Collectable;
class Exposer;
class Registry;
class Counter;
class Gauge;
template <typename T>
class Family;
}  // namespace prometheus

namespace loopmoe::coordinator {

class CoordinatorMetrics {
 public:
  // `listen` ("host:port", port 0 = any): serve /metrics there; empty: keep the gauges unserved.
  // Throws std::runtime_error naming the address when it cannot bind.
  explicit CoordinatorMetrics(const std::string& listen);
  ~CoordinatorMetrics();

  // "host:port" actually bound, empty when not serving.
  std::string address() const { return address_; }

  void set_jobs(const std::vector<v1::JobStatus>& jobs) ABSL_LOCKS_EXCLUDED(mu_);
  void set_processes(const std::vector<ProcessInfo>& processes, const ProcessRegistry& registry)
      ABSL_LOCKS_EXCLUDED(mu_);
  void set_job_progress(const std::string& job_id, int64_t step, double loss)
      ABSL_LOCKS_EXCLUDED(mu_);
  // A loss spike the job's numerics guard warned about (train.loss_spike_action = "warn").
  void count_loss_spike(const std::string& job_id) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<prometheus::Collectable> process_resources_;  // stateless, served with registry_
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::string address_;
  // Set by the constructor. The families are thread-safe themselves; mu_ serialises the set_*
  // calls, each several updates (set_processes adds and removes series).
  absl::Mutex mu_;
  prometheus::Family<prometheus::Gauge>* jobs_ ABSL_PT_GUARDED_BY(mu_) = nullptr;
  prometheus::Family<prometheus::Gauge>* processes_ ABSL_PT_GUARDED_BY(mu_) = nullptr;
  prometheus::Family<prometheus::Gauge>* heartbeat_age_ ABSL_PT_GUARDED_BY(mu_) = nullptr;
  prometheus::Family<prometheus::Gauge>* job_step_ ABSL_PT_GUARDED_BY(mu_) = nullptr;
  prometheus::Family<prometheus::Gauge>* job_loss_ ABSL_PT_GUARDED_BY(mu_) = nullptr;
  prometheus::Family<prometheus::Counter>* job_loss_spikes_ ABSL_PT_GUARDED_BY(mu_) = nullptr;
};

}  // namespace loopmoe::coordinator
