#include "coordinator/metrics.h"

#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/metric_family.h>
#include <prometheus/registry.h>

#include <set>
#include <stdexcept>

#include "common/process_collector.h"
#include "coordinator/job_spec.h"

namespace loopmoe::coordinator {
namespace {

const char* role_label(v1::Role role) {
  return role == v1::EXPERT_SHARD ? "expert_shard" : role == v1::WORKER ? "worker" : "unknown";
}

}  // namespace

CoordinatorMetrics::CoordinatorMetrics(const std::string& listen)
    : registry_(std::make_shared<prometheus::Registry>()),
      process_resources_(common::make_process_collector()) {
  jobs_ = &prometheus::BuildGauge()
               .Name("loopmoe_coordinator_jobs")
               .Help("Jobs known to the coordinator, by state")
               .Register(*registry_);
  processes_ = &prometheus::BuildGauge()
                    .Name("loopmoe_coordinator_processes")
                    .Help("Registered training processes, by role and liveness")
                    .Register(*registry_);
  heartbeat_age_ = &prometheus::BuildGauge()
                        .Name("loopmoe_process_heartbeat_age_seconds")
                        .Help("Seconds since the process's last heartbeat")
                        .Register(*registry_);
  job_step_ = &prometheus::BuildGauge()
                   .Name("loopmoe_job_step")
                   .Help("Training steps completed by the job")
                   .Register(*registry_);
  job_loss_ = &prometheus::BuildGauge()
                   .Name("loopmoe_job_loss")
                   .Help("Training loss of the job's last completed step")
                   .Register(*registry_);
  job_loss_spikes_ = &prometheus::BuildCounter()
                          .Name("loopmoe_job_loss_spikes_total")
                          .Help(
                              "Loss spikes the job's numerics guard warned about "
                              "(train.loss_spike_factor, loss_spike_action = \"warn\")")
                          .Register(*registry_);
  for (auto state :
       {v1::QUEUED, v1::STARTING, v1::RUNNING, v1::SUCCEEDED, v1::FAILED, v1::CANCELLED}) {
    jobs_->Add({{"state", job_state_name(state)}}).Set(0);
  }
  for (auto role : {v1::WORKER, v1::EXPERT_SHARD}) {
    for (const char* state : {"live", "dead"}) {
      processes_->Add({{"role", role_label(role)}, {"state", state}}).Set(0);
    }
  }
  if (!listen.empty()) {
    try {
      exposer_ = std::make_unique<prometheus::Exposer>(listen, 1);
    } catch (const std::exception& e) {
      throw std::runtime_error("cannot serve metrics on " + listen + ": " + e.what());
    }
    exposer_->RegisterCollectable(registry_);
    exposer_->RegisterCollectable(process_resources_);
    const auto ports = exposer_->GetListeningPorts();
    const std::string host = listen.substr(0, listen.rfind(':'));
    address_ = host + ":" + (ports.empty() ? std::string("?") : std::to_string(ports[0]));
  }
}

CoordinatorMetrics::~CoordinatorMetrics() = default;

void CoordinatorMetrics::set_jobs(const std::vector<v1::JobStatus>& jobs) {
  std::map<std::string, int> counts;
  for (const v1::JobStatus& job : jobs) ++counts[job_state_name(job.state())];
  absl::MutexLock lock(&mu_);
  for (auto state :
       {v1::QUEUED, v1::STARTING, v1::RUNNING, v1::SUCCEEDED, v1::FAILED, v1::CANCELLED}) {
    jobs_->Add({{"state", job_state_name(state)}}).Set(counts[job_state_name(state)]);
  }
}

void CoordinatorMetrics::set_processes(const std::vector<ProcessInfo>& processes,
                                       const ProcessRegistry& registry) {
  const auto now = ProcessRegistry::Clock::now();
  std::map<std::pair<std::string, std::string>, int> counts;
  std::set<std::string> present;
  absl::MutexLock lock(&mu_);
  for (const ProcessInfo& p : processes) {
    const bool live = registry.is_live_locked(p, now);
    ++counts[{role_label(p.role), live ? "live" : "dead"}];
    if (p.removed) continue;  // a removed process is gone until it registers again
    present.insert(p.id);
    const double age = std::chrono::duration<double>(now - p.last_heartbeat).count();
    heartbeat_age_->Add({{"process_id", p.id}, {"role", role_label(p.role)}}).Set(age);
  }
  for (auto role : {v1::WORKER, v1::EXPERT_SHARD}) {
    for (const char* state : {"live", "dead"}) {
      processes_->Add({{"role", role_label(role)}, {"state", state}})
          .Set(counts[{role_label(role), state}]);
    }
  }
  for (const ProcessInfo& p : processes) {
    if (!present.count(p.id)) {
      const prometheus::Labels labels{{"process_id", p.id}, {"role", role_label(p.role)}};
      if (heartbeat_age_->Has(labels)) heartbeat_age_->Remove(&heartbeat_age_->Add(labels));
    }
  }
}

void CoordinatorMetrics::set_job_progress(const std::string& job_id, int64_t step, double loss) {
  absl::MutexLock lock(&mu_);
  job_step_->Add({{"job_id", job_id}}).Set(static_cast<double>(step));
  job_loss_->Add({{"job_id", job_id}}).Set(loss);
}

void CoordinatorMetrics::count_loss_spike(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  job_loss_spikes_->Add({{"job_id", job_id}}).Increment();
}

}  // namespace loopmoe::coordinator
