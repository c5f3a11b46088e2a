// Prometheus metrics of the coordinator (names: docs/SERVICE.md), served by a pull Exposer when a
// listen address is given. Thread-safe.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "coordinator/process_registry.h"
#include "proto/loopmoe.pb.h"

namespace prometheus {
class Exposer;
class Registry;
class Gauge;
template <typename T>
class Family;
}  // namespace prometheus

namespace loopmoe::service {

class CoordinatorMetrics {
 public:
  // `listen` ("host:port", port 0 = any): serve /metrics there; empty: keep the gauges unserved.
  // Throws std::runtime_error naming the address when it cannot bind.
  explicit CoordinatorMetrics(const std::string& listen);
  ~CoordinatorMetrics();

  // "host:port" actually bound, empty when not serving.
  std::string address() const { return address_; }

  void set_jobs(const std::vector<v1::JobStatus>& jobs);
  void set_processes(const std::vector<ProcessInfo>& processes, const ProcessRegistry& registry);
  void set_job_progress(const std::string& job_id, int64_t step, double loss);

 private:
  std::mutex mu_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::string address_;
  prometheus::Family<prometheus::Gauge>* jobs_ = nullptr;
  prometheus::Family<prometheus::Gauge>* processes_ = nullptr;
  prometheus::Family<prometheus::Gauge>* heartbeat_age_ = nullptr;
  prometheus::Family<prometheus::Gauge>* job_step_ = nullptr;
  prometheus::Family<prometheus::Gauge>* job_loss_ = nullptr;
};

}  // namespace loopmoe::service
