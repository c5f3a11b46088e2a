#include "process/process_metrics.h"

#include <prometheus/exposer.h>
#include <prometheus/metric_family.h>
#include <prometheus/text_serializer.h>

#include <algorithm>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "common/clock.h"
#include "common/process_collector.h"
#include "process/roles.h"

namespace loopmoe::process {
namespace {

using Clock = std::chrono::steady_clock;

// Steps take from milliseconds (tiny models) to minutes (large ones).
const prometheus::Histogram::BucketBoundaries kStepBuckets = {
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300};

}  // namespace

// Computed at scrape time, so the age keeps growing while heartbeats fail (a gauge set by the
// heartbeat thread would freeze at its last value exactly when it matters).
class ProcessMetrics::HeartbeatAge final : public prometheus::Collectable {
 public:
  explicit HeartbeatAge(std::string role) : role_(std::move(role)), last_ack_(Clock::now()) {}

  void acknowledge() {
    absl::MutexLock lock(&mutex_);
    last_ack_ = Clock::now();
  }

  std::vector<prometheus::MetricFamily> Collect() const override {
    prometheus::MetricFamily family;
    family.name = "loopmoe_heartbeat_age_seconds";
    family.help =
        "Seconds since the coordinator last acknowledged a heartbeat or registration of this "
        "process (since process start before the first)";
    family.type = prometheus::MetricType::Gauge;
    prometheus::ClientMetric metric;
    metric.label.push_back({"role", role_});
    {
      absl::MutexLock lock(&mutex_);
      metric.gauge.value = common::seconds_since(last_ack_);
    }
    family.metric.push_back(std::move(metric));
    return {std::move(family)};
  }

 private:
  const std::string role_;
  mutable absl::Mutex mutex_;
  Clock::time_point last_ack_ ABSL_GUARDED_BY(mutex_);
};

struct ProcessMetrics::JobSeries {
  prometheus::Labels labels;  // role is a constant label of every family
  int n_layers = 1;
  prometheus::Gauge* train_loss = nullptr;  // workers only
  prometheus::Gauge* tokens_per_second = nullptr;
  prometheus::Histogram* step_duration = nullptr;
  prometheus::Counter* steps_total = nullptr;
  prometheus::Counter* alltoall_bytes = nullptr;
  prometheus::Counter* alltoall_seconds = nullptr;
  prometheus::Counter* dropped_tokens = nullptr;
  prometheus::Counter* nonfinite_steps = nullptr;
  prometheus::Gauge* validation_loss = nullptr;  // workers only, from the first evaluation
  std::map<std::tuple<int, int, int>, prometheus::Counter*> expert_tokens;  // (layer, iter, expert)
  std::map<std::pair<int, int>, prometheus::Gauge*> overload;               // (layer, iteration)

  prometheus::Labels with(
      std::initializer_list<std::pair<const std::string, std::string>> extra) const {
    prometheus::Labels result = labels;
    result.insert(extra);
    return result;
  }
};

ProcessMetrics::ProcessMetrics(runtime::Role role)
    : role_(role),
      registry_(std::make_shared<prometheus::Registry>()),
      heartbeat_age_(std::make_shared<HeartbeatAge>(role_label(role))),
      process_resources_(common::make_process_collector()),
      train_loss_(prometheus::BuildGauge()
                      .Name("loopmoe_train_loss")
                      .Help("Total training loss (ce + aux + z) of the last step, global batch")
                      .Labels({{"role", role_label(role)}})
                      .Register(*registry_)),
      tokens_per_second_(prometheus::BuildGauge()
                             .Name("loopmoe_train_tokens_per_second")
                             .Help("Global tokens of the last step divided by its wall time")
                             .Labels({{"role", role_label(role)}})
                             .Register(*registry_)),
      step_duration_(prometheus::BuildHistogram()
                         .Name("loopmoe_step_duration_seconds")
                         .Help("Wall time of one training step in this process")
                         .Labels({{"role", role_label(role)}})
                         .Register(*registry_)),
      steps_total_(prometheus::BuildCounter()
                       .Name("loopmoe_steps_total")
                       .Help("Training steps completed by this process")
                       .Labels({{"role", role_label(role)}})
                       .Register(*registry_)),
      alltoall_bytes_(prometheus::BuildCounter()
                          .Name("loopmoe_alltoall_bytes_total")
                          .Help("Bytes this process sent by all-to-all")
                          .Labels({{"role", role_label(role)}})
                          .Register(*registry_)),
      alltoall_seconds_(prometheus::BuildCounter()
                            .Name("loopmoe_alltoall_seconds_total")
                            .Help("Seconds this process spent in all-to-all")
                            .Labels({{"role", role_label(role)}})
                            .Register(*registry_)),
      expert_tokens_(prometheus::BuildCounter()
                         .Name("loopmoe_expert_tokens_total")
                         .Help("Global tokens routed to each expert per (layer, iteration), "
                               "after capacity drops; reported by worker 0")
                         .Labels({{"role", role_label(role)}})
                         .Register(*registry_)),
      dropped_tokens_(prometheus::BuildCounter()
                          .Name("loopmoe_dropped_tokens_total")
                          .Help("Global (token, expert) assignments dropped over capacity; every "
                                "worker reports the same global count")
                          .Labels({{"role", role_label(role)}})
                          .Register(*registry_)),
      nonfinite_steps_(prometheus::BuildCounter()
                           .Name("loopmoe_nonfinite_steps_total")
                           .Help("Steps the numerics guard skipped (train.nonfinite = \"skip\", or "
                                 "\"rollback\" on the replay, which drops the step): NaN or Inf "
                                 "loss or gradient norm; every process counts each")
                           .Labels({{"role", role_label(role)}})
                           .Register(*registry_)),
      overload_factor_(prometheus::BuildGauge()
                           .Name("loopmoe_expert_overload_factor")
                           .Help("Per layer application (layer, iteration) of the last step: "
                                 "tokens of the busiest expert / mean tokens per expert")
                           .Labels({{"role", role_label(role)}})
                           .Register(*registry_)),
      validation_loss_(prometheus::BuildGauge()
                           .Name("loopmoe_validation_loss")
                           .Help("Mean validation cross-entropy of the last evaluation")
                           .Labels({{"role", role_label(role)}})
                           .Register(*registry_)) {}

ProcessMetrics::~ProcessMetrics() = default;

int ProcessMetrics::serve(const std::string& listen) {
  if (exposer_) throw std::logic_error("ProcessMetrics::serve called twice");
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(listen, 1);
  } catch (const std::exception& e) {
    throw std::runtime_error("metrics: cannot listen on " + listen + ": " + e.what());
  }
  exposer_->RegisterCollectable(registry_);
  exposer_->RegisterCollectable(heartbeat_age_);
  exposer_->RegisterCollectable(process_resources_);
  std::vector<int> ports = exposer_->GetListeningPorts();
  if (ports.empty()) throw std::runtime_error("metrics: no listening port on " + listen);
  return ports.front();
}

void ProcessMetrics::drop_job_series_locked() {
  if (!job_) return;
  auto remove = [](auto& family, auto* metric) {
    if (metric) family.Remove(metric);
  };
  remove(train_loss_, job_->train_loss);
  remove(tokens_per_second_, job_->tokens_per_second);
  remove(step_duration_, job_->step_duration);
  remove(steps_total_, job_->steps_total);
  remove(alltoall_bytes_, job_->alltoall_bytes);
  remove(alltoall_seconds_, job_->alltoall_seconds);
  remove(dropped_tokens_, job_->dropped_tokens);
  remove(nonfinite_steps_, job_->nonfinite_steps);
  remove(validation_loss_, job_->validation_loss);
  for (auto& [key, counter] : job_->expert_tokens) remove(expert_tokens_, counter);
  for (auto& [key, gauge] : job_->overload) remove(overload_factor_, gauge);
  job_.reset();
}

void ProcessMetrics::begin_job(const std::string& job_id, int rank, int n_layers) {
  absl::MutexLock lock(&mutex_);
  drop_job_series_locked();
  auto job = std::make_unique<JobSeries>();
  job->labels = {{"job_id", job_id}, {"rank", std::to_string(rank)}};
  job->n_layers = std::max(1, n_layers);
  if (role_ == runtime::Role::kWorker) job->train_loss = &train_loss_.Add(job->labels);
  job->tokens_per_second = &tokens_per_second_.Add(job->labels);
  job->step_duration = &step_duration_.Add(job->labels, kStepBuckets);
  job->steps_total = &steps_total_.Add(job->labels);
  job->alltoall_bytes = &alltoall_bytes_.Add(job->labels);
  job->alltoall_seconds = &alltoall_seconds_.Add(job->labels);
  job->dropped_tokens = &dropped_tokens_.Add(job->labels);
  job->nonfinite_steps = &nonfinite_steps_.Add(job->labels);
  job_ = std::move(job);
}

void ProcessMetrics::record_step(const runtime::StepReport& report) {
  absl::MutexLock lock(&mutex_);
  if (!job_) return;
  if (job_->train_loss) job_->train_loss->Set(report.loss);
  job_->tokens_per_second->Set(
      report.seconds > 0 ? static_cast<double>(report.tokens) / report.seconds : 0.0);
  job_->step_duration->Observe(report.seconds);
  job_->steps_total->Increment();
  job_->alltoall_bytes->Increment(static_cast<double>(std::max<int64_t>(0, report.alltoall_bytes)));
  job_->alltoall_seconds->Increment(std::max(0.0, report.alltoall_seconds));
  job_->dropped_tokens->Increment(static_cast<double>(std::max<int64_t>(0, report.dropped)));
  if (report.skipped) job_->nonfinite_steps->Increment();
  record_expert_tokens_locked(report);
}

void ProcessMetrics::record_expert_tokens_locked(const runtime::StepReport& report) {
  const int64_t experts = report.num_experts;
  const int64_t applications = static_cast<int64_t>(report.loops) * job_->n_layers;
  // Only worker 0 reports the table; a table of the wrong shape is ignored rather than
  // mislabelled (metrics must never fail a step).
  if (report.expert_tokens.empty() || experts <= 0 || applications <= 0 ||
      static_cast<int64_t>(report.expert_tokens.size()) != applications * experts) {
    return;
  }
  for (int64_t application = 0; application < applications; ++application) {
    const int layer = static_cast<int>(application % job_->n_layers);
    const int iteration = static_cast<int>(application / job_->n_layers);
    const int64_t* row = report.expert_tokens.data() + application * experts;
    int64_t total = 0, busiest = 0;
    for (int expert = 0; expert < experts; ++expert) {
      const int64_t tokens = std::max<int64_t>(0, row[expert]);
      total += tokens;
      busiest = std::max(busiest, tokens);
      prometheus::Counter*& counter = job_->expert_tokens[{layer, iteration, expert}];
      if (!counter) {
        counter = &expert_tokens_.Add(job_->with({{"layer", std::to_string(layer)},
                                                  {"iteration", std::to_string(iteration)},
                                                  {"expert", std::to_string(expert)}}));
      }
      counter->Increment(static_cast<double>(tokens));
    }
    prometheus::Gauge*& gauge = job_->overload[{layer, iteration}];
    if (!gauge) {
      gauge = &overload_factor_.Add(
          job_->with({{"layer", std::to_string(layer)}, {"iteration", std::to_string(iteration)}}));
    }
    gauge->Set(total > 0 ? static_cast<double>(busiest) * static_cast<double>(experts) /
                               static_cast<double>(total)
                         : 0.0);
  }
  // Iterations this step did not run (a schedule with varying loop counts) would otherwise show
  // an old step's overload as if current.
  for (auto it = job_->overload.begin(); it != job_->overload.end();) {
    if (it->first.second >= report.loops) {
      overload_factor_.Remove(it->second);
      it = job_->overload.erase(it);
    } else {
      ++it;
    }
  }
}

void ProcessMetrics::record_validation_loss(double val_loss) {
  if (role_ != runtime::Role::kWorker) return;  // shards take part in evaluation but return 0
  absl::MutexLock lock(&mutex_);
  if (!job_) return;
  if (!job_->validation_loss) job_->validation_loss = &validation_loss_.Add(job_->labels);
  job_->validation_loss->Set(val_loss);
}

void ProcessMetrics::record_heartbeat_ack() { heartbeat_age_->acknowledge(); }

std::string ProcessMetrics::text() const {
  std::vector<prometheus::MetricFamily> families = registry_->Collect();
  auto append = [&families](std::vector<prometheus::MetricFamily> more) {
    for (prometheus::MetricFamily& family : more) families.push_back(std::move(family));
  };
  append(heartbeat_age_->Collect());
  append(process_resources_->Collect());
  return prometheus::TextSerializer().Serialize(families);
}

}  // namespace loopmoe::process
