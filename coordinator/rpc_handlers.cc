// The Coordinator gRPC service methods (proto/loopmoe.proto, docs/SERVICE.md): jobs, logs,
// checkpoints, the process registry and the rendezvous KV. They only read and write the job store,
// the queue and the registry; the scheduler and the job drivers do the rest.
#include <absl/time/time.h>
#include <xxhash.h>

#include <algorithm>

#include "coordinator/coordinator_impl.h"
#include "coordinator/job_spec.h"
#include "coordinator/output_dir.h"
#include "coordinator/util.h"
#include "dataloader/data_error.h"
#include "model/error.h"

namespace loopmoe::coordinator {

using internal::format;
using internal::job_number;
using internal::unix_ms;

grpc::Status Coordinator::Impl::SubmitJob(grpc::ServerContext*, const v1::SubmitJobRequest* request,
                                          v1::SubmitJobResponse* response) {
  model::Config config;
  try {
    config = validate_job_spec(request->spec(), "job spec");
  } catch (const model::ConfigError& e) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, e.what());
  }
  v1::JobSpec spec = request->spec();
  if (!spec.output_dir().empty()) {
    // Jobs write only under the data root; the resolved path is stored, so the driver and the
    // processes use exactly what was checked.
    try {
      spec.set_output_dir(confine_output_dir(spec.output_dir(), options_.data_root));
    } catch (const std::invalid_argument& e) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          std::string("job spec: output_dir: ") + e.what());
    }
  }
  if (options_.check_data) {
    // A dataset that would fail the job (a missing shard, or one too small for a window) is
    // refused now, not after the workers have trained up to the first validation.
    try {
      check_job_data(config);
    } catch (const dataloader::DataError& e) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          std::string("job spec: data.dir: ") + e.what());
    }
  }
  if (const std::string& from = request->spec().resume_from_job(); !from.empty()) {
    // Refuse now what would fail the job later: an unknown job, no checkpoint, another config.
    const std::vector<v1::CheckpointMeta> checkpoints = store_.list_checkpoints(from);
    if (!store_.get_job(from)) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "job spec: resume_from_job: no job '" + from + "'");
    }
    const v1::CheckpointMeta* pick = nullptr;
    for (const v1::CheckpointMeta& m : checkpoints) {
      if (request->spec().resume_step() == 0 || m.step() == request->spec().resume_step())
        pick = &m;
    }
    if (pick == nullptr) {
      std::string have;
      for (const auto& m : checkpoints)
        have += (have.empty() ? "" : ", ") + std::to_string(m.step());
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "job spec: job " + from + " has no committed checkpoint" +
                              (request->spec().resume_step() > 0
                                   ? " at step " + std::to_string(request->spec().resume_step())
                                   : std::string()) +
                              " (committed steps: " + (have.empty() ? "none" : have) + ")");
    }
    const std::string canonical = model::to_toml(config);
    if (XXH64(canonical.data(), canonical.size(), 0) != pick->config_hash()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "job spec: the config differs from job " + from +
                              "'s (a checkpoint continues only the config it was written for)");
    }
  }
  v1::JobStatus job;
  *job.mutable_spec() = std::move(spec);
  job.set_state(v1::QUEUED);
  job.set_total_steps(config.train.steps);
  job.set_submitted_unix_ms(unix_ms());
  job.set_updated_unix_ms(job.submitted_unix_ms());
  {
    absl::MutexLock lock(&mu_);
    job.set_job_id(store_.next_job_id());
    store_.put_job(job);
    queue_.insert(job_number(job.job_id()));
  }
  log(job.job_id(), format("submitted: %d worker(s), %d shard(s), %d steps",
                           job.spec().num_workers(), job.spec().num_shards(), config.train.steps));
  response->set_job_id(job.job_id());
  return grpc::Status::OK;
}

grpc::Status Coordinator::Impl::GetJob(grpc::ServerContext*, const v1::GetJobRequest* request,
                                       v1::JobStatus* response) {
  std::optional<v1::JobStatus> job = store_.get_job(request->job_id());
  if (!job) return grpc::Status(grpc::StatusCode::NOT_FOUND, "no job '" + request->job_id() + "'");
  *response = *job;
  return grpc::Status::OK;
}

grpc::Status Coordinator::Impl::ListJobs(grpc::ServerContext*, const v1::ListJobsRequest*,
                                         v1::ListJobsResponse* response) {
  for (v1::JobStatus& job : store_.list_jobs()) *response->add_jobs() = std::move(job);
  return grpc::Status::OK;
}

grpc::Status Coordinator::Impl::CancelJob(grpc::ServerContext*, const v1::CancelJobRequest* request,
                                          v1::JobStatus* response) {
  const std::string& id = request->job_id();
  std::string message;
  {
    absl::MutexLock lock(&mu_);
    std::optional<v1::JobStatus> job = store_.get_job(id);
    if (!job) return grpc::Status(grpc::StatusCode::NOT_FOUND, "no job '" + id + "'");
    if (is_terminal(job->state())) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          "job " + id + " has already " + job_state_name(job->state()));
    }
    const bool was_queued = job->state() == v1::QUEUED;
    job->set_state(v1::CANCELLED);
    job->set_updated_unix_ms(unix_ms());
    store_.put_job(*job);
    queue_.erase(job_number(id));
    auto run = running_.find(id);
    if (run != running_.end()) run->second->driver->cancel();
    message = was_queued ? "cancelled while queued"
                         : "cancel requested: stopping after the current step chunk";
    *response = *job;
  }
  log(id, message);
  return grpc::Status::OK;
}

grpc::Status Coordinator::Impl::WatchJob(grpc::ServerContext* context,
                                         const v1::WatchJobRequest* request,
                                         grpc::ServerWriter<v1::LogLine>* writer) {
  const std::string& id = request->job_id();
  if (!store_.get_job(id)) return grpc::Status(grpc::StatusCode::NOT_FOUND, "no job '" + id + "'");
  int64_t next = std::max<int64_t>(request->from_line(), 0);
  bool last_pass = false;
  while (true) {
    for (;;) {
      std::vector<v1::LogLine> lines = store_.read_log(id, next, 1000);
      if (lines.empty()) break;
      for (const v1::LogLine& line : lines) {
        if (!writer->Write(line)) return grpc::Status(grpc::StatusCode::CANCELLED, "client gone");
        next = line.line() + 1;
      }
    }
    if (!request->follow() || last_pass) return grpc::Status::OK;
    absl::MutexLock lock(&mu_);
    if (stopping_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator shutting down");
    if (context->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
    std::optional<v1::JobStatus> job = store_.get_job(id);
    // Done once the job is terminal and its driver has written its last line.
    if (!job || (is_terminal(job->state()) && !running_.count(id))) {
      last_pass = true;
      continue;
    }
    if (store_.log_size(id) <= next) changed_.WaitWithTimeout(&mu_, absl::Milliseconds(200));
  }
}

grpc::Status Coordinator::Impl::ListCheckpoints(grpc::ServerContext*,
                                                const v1::ListCheckpointsRequest* request,
                                                v1::ListCheckpointsResponse* response) {
  if (!store_.get_job(request->job_id())) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, "no job '" + request->job_id() + "'");
  }
  for (v1::CheckpointMeta& m : store_.list_checkpoints(request->job_id())) {
    *response->add_checkpoints() = std::move(m);
  }
  return grpc::Status::OK;
}

grpc::Status Coordinator::Impl::Register(grpc::ServerContext*, const v1::RegisterRequest* request,
                                         v1::RegisterResponse* response) {
  if (request->role() != v1::WORKER && request->role() != v1::EXPERT_SHARD) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "register: role must be WORKER or EXPERT_SHARD");
  }
  if (request->address().empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "register: address is empty");
  }
  response->set_process_id(registry_.register_process(request->role(), request->address(),
                                                      request->metrics_address(), request->name()));
  // Several heartbeats per timeout, so one late heartbeat does not kill a process.
  response->set_heartbeat_interval_ms(
      std::max<int64_t>(50, options_.heartbeat_timeout.count() / 4));
  changed_.SignalAll();
  return grpc::Status::OK;
}

grpc::Status Coordinator::Impl::Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest* request,
                                          v1::HeartbeatResponse* response) {
  response->set_known(registry_.heartbeat(request->process_id()));
  return grpc::Status::OK;
}

grpc::Status Coordinator::Impl::KvSet(grpc::ServerContext*, const v1::KvSetRequest* request,
                                      v1::KvSetResponse*) {
  kv_.set(request->key(), request->value());
  return grpc::Status::OK;
}

grpc::Status Coordinator::Impl::KvGet(grpc::ServerContext*, const v1::KvGetRequest* request,
                                      v1::KvGetResponse* response) {
  if (std::optional<std::string> value = kv_.get(request->key())) {
    response->set_found(true);
    response->set_value(*value);
  }
  return grpc::Status::OK;
}

grpc::Status Coordinator::Impl::KvWait(grpc::ServerContext*, const v1::KvWaitRequest* request,
                                       v1::KvWaitResponse* response) {
  // Bounded server-side so no handler thread is held forever; clients loop until their timeout.
  const auto timeout =
      std::chrono::milliseconds(std::clamp<int64_t>(request->timeout_ms(), 0, 30000));
  std::vector<std::string> keys(request->keys().begin(), request->keys().end());
  for (std::string& key : kv_.wait(keys, timeout)) response->add_missing(std::move(key));
  return grpc::Status::OK;
}

}  // namespace loopmoe::coordinator
