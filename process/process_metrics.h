// Prometheus metrics of one training process (worker or expert shard), served by a pull Exposer
// on --metrics-listen. Every loopmoe_* series carries `role`; training series also carry `job_id`
// and `rank`.
//
// Families (docs: deploy/README.md):
//   loopmoe_train_loss                    gauge      total loss of the last step (workers only)
//   loopmoe_train_tokens_per_second       gauge      global tokens of the last step / its seconds
//   loopmoe_step_duration_seconds         histogram  wall time of each step in this process
//   loopmoe_steps_total                   counter
//   loopmoe_alltoall_bytes_total          counter    bytes this process sent by all-to-all
//   loopmoe_alltoall_seconds_total        counter    time this process spent in all-to-all
//   loopmoe_expert_tokens_total           counter    {layer, iteration, expert}: global tokens
//                                                    routed (after drops); worker 0 only
//   loopmoe_dropped_tokens_total          counter    global drops (every worker reports them)
//   loopmoe_nonfinite_steps_total         counter    steps the numerics guard skipped (NaN/Inf
//                                                    loss or gradient norm; every process)
//   loopmoe_expert_overload_factor        gauge      {layer, iteration}: per layer application of
//                                                    the last step, max tokens of an expert / mean
//                                                    tokens per expert (1 = perfectly balanced)
//   loopmoe_validation_loss               gauge      workers only
//   loopmoe_heartbeat_age_seconds         gauge      seconds since the coordinator last
//                                                    acknowledged a heartbeat (or registration);
//                                                    since process start before the first one
//   process_cpu_seconds_total, process_resident_memory_bytes, process_virtual_memory_bytes,
//   process_open_fds, process_max_fds, process_start_time_seconds, process_threads
//                                                    the standard process series of the
//                                                    Prometheus client libraries, without labels,
//                                                    read from /proc at each scrape
//                                                    (common/process_stats.h)
//
// The series of a job stay until the process joins the next job, so the final values of a job
// can still be scraped after it ends; then they are removed so that a long-lived process does
// not accumulate series. Thread-safe.
#pragma once

#include <absl/base/thread_annotations.h>
#include <absl/synchronization/mutex.h>
#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include "runtime/process_runtime.h"

namespace prometheus {
class Exposer;
}

namespace loopmoe::process {

class ProcessMetrics {
 public:
  explicit ProcessMetrics(runtime::Role role);
  ~ProcessMetrics();
  ProcessMetrics(const ProcessMetrics&) = delete;
  ProcessMetrics& operator=(const ProcessMetrics&) = delete;

  // Serves GET /metrics on `listen` ("host:port"; port 0 picks a free one) and returns the bound
  // port. Throws std::runtime_error with the address if it cannot listen. Call at most once.
  int serve(const std::string& listen);

  // A new job: drops the previous job's series and labels new ones with (job_id, rank).
  // `n_layers` (the config's unique layers) maps StepReport.expert_tokens rows to
  // (layer, iteration).
  void begin_job(const std::string& job_id, int rank, int n_layers) ABSL_LOCKS_EXCLUDED(mutex_);
  void record_step(const runtime::StepReport& report) ABSL_LOCKS_EXCLUDED(mutex_);
  void record_validation_loss(double val_loss) ABSL_LOCKS_EXCLUDED(mutex_);
  // The coordinator acknowledged a heartbeat or a registration just now.
  void record_heartbeat_ack();

  // Everything in the Prometheus text format, as a scrape would see it.
  std::string text() const;
  const std::shared_ptr<prometheus::Registry>& registry() const { return registry_; }

 private:
  class HeartbeatAge;
  struct JobSeries;

  void drop_job_series_locked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  void record_expert_tokens_locked(const runtime::StepReport& report)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);

  const runtime::Role role_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<HeartbeatAge> heartbeat_age_;
  std::shared_ptr<prometheus::Collectable> process_resources_;  // process_*, stateless
  std::unique_ptr<prometheus::Exposer> exposer_;

  prometheus::Family<prometheus::Gauge>& train_loss_;
  prometheus::Family<prometheus::Gauge>& tokens_per_second_;
  prometheus::Family<prometheus::Histogram>& step_duration_;
  prometheus::Family<prometheus::Counter>& steps_total_;
  prometheus::Family<prometheus::Counter>& alltoall_bytes_;
  prometheus::Family<prometheus::Counter>& alltoall_seconds_;
  prometheus::Family<prometheus::Counter>& expert_tokens_;
  prometheus::Family<prometheus::Counter>& dropped_tokens_;
  prometheus::Family<prometheus::Counter>& nonfinite_steps_;
  prometheus::Family<prometheus::Gauge>& overload_factor_;
  prometheus::Family<prometheus::Gauge>& validation_loss_;

  mutable absl::Mutex mutex_;  // the metrics themselves are thread-safe
  std::unique_ptr<JobSeries> job_ ABSL_GUARDED_BY(mutex_) ABSL_PT_GUARDED_BY(mutex_);
};

}  // namespace loopmoe::process
