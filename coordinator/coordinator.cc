#include "coordinator/coordinator.h"

#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "coordinator/job_spec.h"
#include "coordinator/job_store.h"
#include "coordinator/metrics.h"
#include "coordinator/process_registry.h"
#include "coordinator/rendezvous_kv.h"
#include "dataloader/data_error.h"
#include "model/error.h"
#include "proto/loopmoe.grpc.pb.h"

namespace loopmoe::service {
namespace {

// RUN/metrics.jsonl in the output directory, in `loopmoe train`'s format (so `loopmoe compare`
// reads a cluster run like a local one) with full precision. A run resumed from step `keep`
// first drops the records after it, so the file always describes one consistent run.
void truncate_metrics_after(const std::filesystem::path& path, int64_t keep) {
  std::ifstream in(path);
  if (!in) return;
  std::string line, kept;
  while (std::getline(in, line)) {
    const auto pos = line.find("\"step\": ");
    if (pos != std::string::npos && std::stoll(line.substr(pos + 8)) <= keep) kept += line + "\n";
  }
  in.close();
  std::ofstream(path, std::ios::trunc) << kept;
}

std::string step_record(const loopmoe::v1::StepReport& r, double tokens_per_s) {
  char buf[512];
  std::snprintf(buf, sizeof(buf),
                "{\"step\": %lld, \"loss\": %.17g, \"ce\": %.17g, \"aux\": %.17g, \"z\": "
                "%.17g, \"dropped\": %lld, \"lr\": %.17g, \"grad_norm\": %.17g, \"loops\": %d, "
                "\"tokens_per_s\": %.6g}\n",
                static_cast<long long>(r.step()), r.loss(), r.ce(), r.aux(), r.z(),
                static_cast<long long>(r.dropped()), r.lr(), r.grad_norm(), r.loops(),
                tokens_per_s);
  return buf;
}

using Clock = std::chrono::steady_clock;

int64_t unix_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

int64_t job_number(const std::string& job_id) { return std::stoll(job_id); }

std::string role_name(v1::Role role) {
  return role == v1::EXPERT_SHARD ? "shard" : role == v1::WORKER ? "worker" : "process";
}

std::string code_name(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    default:
      return "code " + std::to_string(static_cast<int>(code));
  }
}

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buf[512];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, args);
  va_end(args);
  return buf;
}

// A failure of one run of a job (a process died, timed out or answered with an error): the job
// restarts with the next epoch, unless it is out of restarts.
struct RunFailure : std::runtime_error {
  RunFailure(const std::string& what, std::vector<std::string> unreachable)
      : std::runtime_error(what), unreachable(std::move(unreachable)) {}
  std::vector<std::string> unreachable;  // process ids to declare dead
};
// A failure no restart can fix (the job's config no longer parses, a missing resume checkpoint).
struct PermanentFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// The coordinator is shutting down: leave the job as it is in the store.
struct Stopping {};
// The user cancelled the job.
struct Cancelled {};

// One assigned process, as the driver talks to it.
struct Member {
  std::string id;
  v1::Role role = v1::WORKER;
  int rank = 0;
  std::string address;
  std::unique_ptr<v1::TrainingProcess::Stub> stub;
  std::string label() const {
    return id + " (" + role_name(role) + " " + std::to_string(rank) + " at " + address + ")";
  }
};

struct RunningJob {
  std::string job_id;
  std::vector<Member> members;  // workers by rank, then shards by rank
  std::thread thread;
  std::atomic<bool> cancel{false};
  std::atomic<bool> finished{false};
  std::mutex mu;  // guards active
  std::set<grpc::ClientContext*> active;

  void cancel_calls() {
    std::lock_guard<std::mutex> lock(mu);
    for (grpc::ClientContext* c : active) c->TryCancel();
  }
};

}  // namespace

class Coordinator::Impl final : public v1::Coordinator::Service {
 public:
  explicit Impl(const CoordinatorOptions& options);
  ~Impl() override { shutdown(); }

  void shutdown();

  // ---- Coordinator service
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

 private:
  // ---- jobs (mu_)
  void requeue_after_restart();
  // Reads the job, applies `change` (which may return false to leave it untouched, e.g. when it was
  // cancelled meanwhile), stamps updated_unix_ms and writes it. Returns whether it was written.
  bool update_job(const std::string& job_id, const std::function<bool(v1::JobStatus&)>& change);
  void log(const std::string& job_id, const std::string& text);

  // ---- scheduler
  void scheduler_loop();
  void schedule_locked();
  void reap_finished_locked();

  // ---- driver (one thread per running job)
  void drive(RunningJob* run);
  void drive_run(RunningJob* run);
  // Calls `call(member, context)` on every member concurrently, each with `timeout`; the first
  // failure cancels the others. Throws RunFailure/Stopping; returns when all succeeded.
  void call_all(RunningJob* run, const char* rpc, std::chrono::milliseconds timeout,
                const std::function<grpc::Status(Member&, grpc::ClientContext*)>& call);
  void check_interrupts(RunningJob* run);
  void shutdown_members(RunningJob* run, const std::set<std::string>& skip);
  v1::CheckpointMeta checkpoint(RunningJob* run, const v1::JobStatus& job,
                                const std::string& output_dir, int64_t step);

  std::mutex mu_;
  std::condition_variable changed_;  // job state, logs, processes: wakes scheduler and watchers
  std::set<int64_t> queue_;          // QUEUED jobs, FIFO = id order
  std::map<std::string, std::unique_ptr<RunningJob>> running_;
  bool stopping_ = false;
  bool shut_down_ = false;
  std::thread scheduler_;
};

Coordinator::Impl::Impl(const CoordinatorOptions& options)
    : options_(options),
      data_dir_(std::filesystem::absolute(options.data_dir).lexically_normal().string()),
      store_(data_dir_ + "/db"),
      registry_(options.heartbeat_timeout),
      metrics_(options.metrics_listen) {
  requeue_after_restart();
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(options.listen, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(this);
  server_ = builder.BuildAndStart();
  if (!server_ || port == 0) {
    throw std::runtime_error("cannot listen on " + options.listen +
                             " (address in use or invalid?)");
  }
  address_ = options.listen.substr(0, options.listen.rfind(':')) + ":" + std::to_string(port);
  server_->GetHealthCheckService()->SetServingStatus(true);
  scheduler_ = std::thread([this] { scheduler_loop(); });
}

void Coordinator::Impl::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shut_down_) return;
    shut_down_ = true;
    stopping_ = true;
    for (auto& [id, run] : running_) run->cancel_calls();
  }
  changed_.notify_all();
  kv_.close();
  if (server_) {
    server_->GetHealthCheckService()->SetServingStatus(false);
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  }
  if (scheduler_.joinable()) scheduler_.join();
  std::map<std::string, std::unique_ptr<RunningJob>> running;
  {
    std::lock_guard<std::mutex> lock(mu_);
    running.swap(running_);
  }
  for (auto& [id, run] : running) {
    run->cancel_calls();
    if (run->thread.joinable()) run->thread.join();
  }
  if (server_) server_->Wait();
}

void Coordinator::Impl::requeue_after_restart() {
  for (v1::JobStatus& job : store_.list_jobs()) {
    if (job.state() == v1::STARTING || job.state() == v1::RUNNING) {
      job.set_state(v1::QUEUED);
      job.set_epoch(job.epoch() + 1);
      job.clear_process_ids();
      job.set_updated_unix_ms(unix_ms());
      store_.put_job(job);
      log(job.job_id(), "coordinator restarted: job requeued as epoch " +
                            std::to_string(job.epoch()) + ", resumes from step " +
                            std::to_string(job.last_checkpoint_step()));
    }
    if (job.state() == v1::QUEUED) queue_.insert(job_number(job.job_id()));
  }
}

bool Coordinator::Impl::update_job(const std::string& job_id,
                                   const std::function<bool(v1::JobStatus&)>& change) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::optional<v1::JobStatus> job = store_.get_job(job_id);
    if (!job || !change(*job)) return false;
    job->set_updated_unix_ms(unix_ms());
    store_.put_job(*job);
  }
  changed_.notify_all();
  return true;
}

void Coordinator::Impl::log(const std::string& job_id, const std::string& text) {
  store_.append_log(job_id, text, unix_ms());
  changed_.notify_all();
}

// ------------------------------------------------------------------------------------------------
// Service

grpc::Status Coordinator::Impl::SubmitJob(grpc::ServerContext*, const v1::SubmitJobRequest* request,
                                          v1::SubmitJobResponse* response) {
  Config config;
  try {
    config = validate_job_spec(request->spec(), "job spec");
  } catch (const ConfigError& e) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, e.what());
  }
  if (options_.check_data) {
    // A dataset that would fail the job (a missing shard, or one too small for a window) is
    // refused now, not after the workers have trained up to the first validation.
    try {
      check_job_data(config);
    } catch (const data::DataError& e) {
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
    const std::string canonical = to_toml(config);
    if (XXH64(canonical.data(), canonical.size(), 0) != pick->config_hash()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "job spec: the config differs from job " + from +
                              "'s (a checkpoint continues only the config it was written for)");
    }
  }
  v1::JobStatus job;
  *job.mutable_spec() = request->spec();
  job.set_state(v1::QUEUED);
  job.set_total_steps(config.train.steps);
  job.set_submitted_unix_ms(unix_ms());
  job.set_updated_unix_ms(job.submitted_unix_ms());
  {
    std::lock_guard<std::mutex> lock(mu_);
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
    std::lock_guard<std::mutex> lock(mu_);
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
    if (run != running_.end()) run->second->cancel = true;
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
    std::unique_lock<std::mutex> lock(mu_);
    if (stopping_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator shutting down");
    if (context->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
    std::optional<v1::JobStatus> job = store_.get_job(id);
    // Done once the job is terminal and its driver has written its last line.
    if (!job || (is_terminal(job->state()) && !running_.count(id))) {
      last_pass = true;
      continue;
    }
    if (store_.log_size(id) <= next) changed_.wait_for(lock, std::chrono::milliseconds(200));
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
  changed_.notify_all();
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

// ------------------------------------------------------------------------------------------------
// Scheduler

void Coordinator::Impl::scheduler_loop() {
  auto next_metrics = Clock::now();
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    reap_finished_locked();
    schedule_locked();
    if (Clock::now() >= next_metrics) {
      lock.unlock();
      metrics_.set_jobs(store_.list_jobs());
      metrics_.set_processes(registry_.snapshot(), registry_);
      lock.lock();
      next_metrics = Clock::now() + std::chrono::seconds(1);
    }
    // Woken by submissions, registrations and finished jobs; the timeout catches processes that
    // became live or dead by the clock alone.
    changed_.wait_for(lock, std::chrono::milliseconds(100));
  }
}

void Coordinator::Impl::reap_finished_locked() {
  for (auto it = running_.begin(); it != running_.end();) {
    if (it->second->finished) {
      it->second->thread.join();  // the driver's last act was setting finished
      it = running_.erase(it);
    } else {
      ++it;
    }
  }
}

void Coordinator::Impl::schedule_locked() {
  while (!queue_.empty()) {
    const std::string id = std::to_string(*queue_.begin());
    std::optional<v1::JobStatus> job = store_.get_job(id);
    if (!job || job->state() != v1::QUEUED) {
      queue_.erase(queue_.begin());
      continue;
    }
    if (running_.count(id)) return;  // requeued by its driver, which has not finished yet
    // Strict FIFO: a job waits until the head of the queue has started.
    std::vector<std::string> workers = registry_.idle(v1::WORKER);
    std::vector<std::string> shards = registry_.idle(v1::EXPERT_SHARD);
    const size_t w = job->spec().num_workers(), s = job->spec().num_shards();
    if (workers.size() < w || shards.size() < s) return;
    std::vector<std::string> ids(workers.begin(), workers.begin() + w);
    ids.insert(ids.end(), shards.begin(), shards.begin() + s);
    if (!registry_.assign(ids, id)) return;  // one died in between; retry next tick

    auto run = std::make_unique<RunningJob>();
    run->job_id = id;
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(256 << 20);
    for (size_t i = 0; i < ids.size(); ++i) {
      std::optional<ProcessInfo> p = registry_.get(ids[i]);
      Member m;
      m.id = ids[i];
      m.role = i < w ? v1::WORKER : v1::EXPERT_SHARD;
      m.rank = static_cast<int>(i < w ? i : i - w);
      m.address = p ? p->address : "";
      m.stub = v1::TrainingProcess::NewStub(
          grpc::CreateCustomChannel(m.address, grpc::InsecureChannelCredentials(), args));
      run->members.push_back(std::move(m));
    }
    job->set_state(v1::STARTING);
    job->clear_process_ids();
    for (const std::string& pid : ids) job->add_process_ids(pid);
    job->set_updated_unix_ms(unix_ms());
    store_.put_job(*job);
    queue_.erase(queue_.begin());
    RunningJob* raw = run.get();
    running_[id] = std::move(run);
    raw->thread = std::thread([this, raw] { drive(raw); });
  }
}

// ------------------------------------------------------------------------------------------------
// Driver

void Coordinator::Impl::call_all(
    RunningJob* run, const char* rpc, std::chrono::milliseconds timeout,
    const std::function<grpc::Status(Member&, grpc::ClientContext*)>& call) {
  const size_t n = run->members.size();
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts(n);
  std::vector<grpc::Status> statuses(n);
  std::vector<char> cancelled_by_us(n, 0);
  {
    std::lock_guard<std::mutex> lock(run->mu);
    for (size_t i = 0; i < n; ++i) {
      contexts[i] = std::make_unique<grpc::ClientContext>();
      contexts[i]->set_deadline(std::chrono::system_clock::now() + timeout);
      run->active.insert(contexts[i].get());
    }
  }
  bool stopping;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping = stopping_;
  }
  if (stopping) run->cancel_calls();  // shutdown() may have run before these contexts existed
  std::vector<std::thread> threads;
  for (size_t i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      statuses[i] = call(run->members[i], contexts[i].get());
      if (!statuses[i].ok()) {
        // One failure fails the step for everyone: don't wait for the others' timeouts.
        std::lock_guard<std::mutex> lock(run->mu);
        for (size_t j = 0; j < n; ++j) {
          if (j != i && !cancelled_by_us[j]) {
            cancelled_by_us[j] = 1;
            contexts[j]->TryCancel();
          }
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  {
    std::lock_guard<std::mutex> lock(run->mu);
    for (auto& c : contexts) run->active.erase(c.get());
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) throw Stopping{};
  }
  // The root cause: an unreachable process first, then any other error we did not cause.
  int root = -1;
  std::vector<std::string> unreachable;
  for (size_t i = 0; i < n; ++i) {
    if (statuses[i].ok()) continue;
    if (statuses[i].error_code() == grpc::StatusCode::UNAVAILABLE) {
      unreachable.push_back(run->members[i].id);
      if (root < 0 || statuses[root].error_code() != grpc::StatusCode::UNAVAILABLE) root = i;
    } else if (root < 0 &&
               !(cancelled_by_us[i] && statuses[i].error_code() == grpc::StatusCode::CANCELLED)) {
      root = i;
    }
  }
  if (root < 0) {
    for (size_t i = 0; i < n && root < 0; ++i) {
      if (!statuses[i].ok()) root = i;
    }
  }
  if (root >= 0) {
    const grpc::Status& s = statuses[root];
    throw RunFailure(std::string(rpc) + " on " + run->members[root].label() +
                         " failed: " + code_name(s.error_code()) + ": " + s.error_message(),
                     unreachable);
  }
}

void Coordinator::Impl::check_interrupts(RunningJob* run) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) throw Stopping{};
  }
  if (run->cancel) throw Cancelled{};
  for (const Member& m : run->members) {
    if (!registry_.is_live(m.id)) {
      throw RunFailure(m.label() + " is dead (no heartbeat for " +
                           std::to_string(options_.heartbeat_timeout.count()) + " ms)",
                       {m.id});
    }
  }
}

void Coordinator::Impl::shutdown_members(RunningJob* run, const std::set<std::string>& skip) {
  std::vector<std::thread> threads;
  for (Member& m : run->members) {
    if (skip.count(m.id)) continue;
    threads.emplace_back([&] {
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + options_.shutdown_timeout);
      v1::ShutdownRequest request;
      request.set_job_id(run->job_id);
      request.set_exit(false);
      v1::ShutdownResponse response;
      (void)m.stub->Shutdown(&context, request, &response);  // best effort
    });
  }
  for (std::thread& t : threads) t.join();
}

v1::CheckpointMeta Coordinator::Impl::checkpoint(RunningJob* run, const v1::JobStatus& job,
                                                 const std::string& output_dir, int64_t step) {
  const std::string dir = output_dir + "/checkpoints/" + format("step-%08lld", (long long)step);
  std::vector<v1::CheckpointResponse> responses(run->members.size());
  call_all(run, "Checkpoint", options_.step_timeout, [&](Member& m, grpc::ClientContext* c) {
    v1::CheckpointRequest request;
    request.set_job_id(run->job_id);
    request.set_step(step);
    request.set_dir(dir);
    return m.stub->Checkpoint(c, request, &responses[&m - run->members.data()]);
  });
  // Every process has fsynced its file: the checkpoint counts once this record is committed.
  const Config config = parse_config(job.spec().config_toml(), "job " + job.job_id());
  const std::string canonical = to_toml(config);
  v1::CheckpointMeta meta;
  meta.set_job_id(run->job_id);
  meta.set_step(step);
  meta.set_epoch(job.epoch());
  for (size_t i = 0; i < responses.size(); ++i) {
    v1::CheckpointFile* f = meta.add_files();
    *f = responses[i].file();
    f->set_role(run->members[i].role);
    f->set_rank(run->members[i].rank);
  }
  *meta.mutable_sampler() = responses[0].sampler();
  meta.set_config_hash(XXH64(canonical.data(), canonical.size(), 0));
  meta.set_num_workers(job.spec().num_workers());
  meta.set_num_shards(job.spec().num_shards());
  meta.set_threads(std::max(1, job.spec().threads()));
  meta.set_created_unix_ms(unix_ms());
  store_.put_checkpoint(meta);
  return meta;
}

void Coordinator::Impl::drive(RunningJob* run) {
  const std::string id = run->job_id;
  std::set<std::string> dead;
  try {
    drive_run(run);
  } catch (const Stopping&) {
    // Coordinator shutdown: the job stays STARTING/RUNNING and is requeued at the next start.
    shutdown_members(run, {});
  } catch (const Cancelled&) {
    shutdown_members(run, {});
    std::optional<v1::JobStatus> job = store_.get_job(id);
    log(id, "cancelled at step " + std::to_string(job ? job->step() : 0));
  } catch (const PermanentFailure& e) {
    log(id, std::string("error: ") + e.what());
    shutdown_members(run, {});
    update_job(id, [&](v1::JobStatus& job) {
      if (is_terminal(job.state())) return false;
      job.set_state(v1::FAILED);
      job.set_error(e.what());
      return true;
    });
    log(id, "failed");
  } catch (const RunFailure& e) {
    log(id, std::string("error: ") + e.what());
    dead.insert(e.unreachable.begin(), e.unreachable.end());
    for (const std::string& pid : dead) registry_.remove(pid);
    shutdown_members(run, dead);
    bool requeued = false;
    int64_t epoch = 0;
    update_job(id, [&](v1::JobStatus& job) {
      if (is_terminal(job.state())) return false;  // cancelled meanwhile
      if (job.epoch() >= options_.max_restarts) {
        job.set_state(v1::FAILED);
        job.set_error(std::string(e.what()) + " (after " + std::to_string(job.epoch()) +
                      " restart(s))");
      } else {
        job.set_state(v1::QUEUED);
        job.set_epoch(job.epoch() + 1);
        job.clear_process_ids();
        requeued = true;
        epoch = job.epoch();
      }
      return true;
    });
    if (requeued) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        queue_.insert(job_number(id));  // scheduled again once this driver has finished
      }
      log(id, "restarting as epoch " + std::to_string(epoch) + " from its latest checkpoint");
    } else if (std::optional<v1::JobStatus> job = store_.get_job(id);
               job && job->state() == v1::FAILED) {
      log(id,
          "failed: out of restarts (--max-restarts " + std::to_string(options_.max_restarts) + ")");
    }
  } catch (const std::exception& e) {
    // Store errors and the like: the coordinator itself is in trouble; say so and fail the job.
    std::fprintf(stderr, "coordinator: job %s: internal error: %s\n", id.c_str(), e.what());
    shutdown_members(run, {});
    try {
      update_job(id, [&](v1::JobStatus& job) {
        if (is_terminal(job.state())) return false;
        job.set_state(v1::FAILED);
        job.set_error(std::string("coordinator internal error: ") + e.what());
        return true;
      });
    } catch (const std::exception&) {
      // The store itself failed; the job is requeued when the coordinator restarts.
    }
  }
  std::vector<std::string> ids;
  for (const Member& m : run->members) ids.push_back(m.id);
  registry_.release(ids, id);
  {
    std::lock_guard<std::mutex> lock(mu_);
    run->finished = true;
  }
  changed_.notify_all();
}

void Coordinator::Impl::drive_run(RunningJob* run) {
  const std::string id = run->job_id;
  std::optional<v1::JobStatus> job = store_.get_job(id);
  if (!job) throw PermanentFailure("job record disappeared");
  const v1::JobSpec& spec = job->spec();
  Config config;
  try {
    config = parse_config(spec.config_toml(), "job " + id);
  } catch (const ConfigError& e) {
    throw PermanentFailure(e.what());
  }
  const TrainConfig& train = config.train;
  const std::string output_dir =
      spec.output_dir().empty() ? data_dir_ + "/jobs/" + id : spec.output_dir();
  const int64_t epoch = job->epoch();

  // Resume point: the requested committed checkpoint, else the latest, else a fresh start. A job
  // started from another job's checkpoint uses that one until it has committed its own.
  v1::CheckpointMeta resume;
  std::vector<v1::CheckpointMeta> checkpoints = store_.list_checkpoints(id);
  const bool from_other = checkpoints.empty() && !spec.resume_from_job().empty();
  if (from_other) checkpoints = store_.list_checkpoints(spec.resume_from_job());
  const bool own_latest = !from_other && !spec.resume_from_job().empty();
  if (!checkpoints.empty()) {
    if (spec.resume_step() == 0 || own_latest) {
      resume = checkpoints.back();
    } else {
      auto it =
          std::find_if(checkpoints.begin(), checkpoints.end(),
                       [&](const v1::CheckpointMeta& m) { return m.step() == spec.resume_step(); });
      if (it == checkpoints.end()) {
        std::string have;
        for (const auto& m : checkpoints)
          have += (have.empty() ? "" : ", ") + std::to_string(m.step());
        throw PermanentFailure("no committed checkpoint at resume_step " +
                               std::to_string(spec.resume_step()) + " (committed steps: " + have +
                               ")");
      }
      resume = *it;
    }
  }
  std::string who;
  for (const Member& m : run->members) who += (who.empty() ? "" : ", ") + m.label();
  log(id, format("epoch %lld: starting on ", (long long)epoch) + who +
              (resume.step() > 0 ? format(", resuming from step %lld", (long long)resume.step()) +
                                       (from_other ? " of job " + spec.resume_from_job() : "")
                                 : std::string(", from step 0")));

  const std::string prefix = "job/" + id + "/epoch/" + std::to_string(epoch) + "/";
  call_all(run, "Configure", options_.configure_timeout, [&](Member& m, grpc::ClientContext* c) {
    v1::ConfigureRequest request;
    request.set_job_id(id);
    request.set_epoch(epoch);
    request.set_role(m.role);
    request.set_rank(m.rank);
    request.set_num_workers(spec.num_workers());
    request.set_num_shards(spec.num_shards());
    request.set_config_toml(spec.config_toml());
    request.set_threads(std::max(1, spec.threads()));
    request.set_rendezvous_prefix(prefix);
    request.set_output_dir(output_dir);
    if (resume.step() > 0) *request.mutable_resume() = resume;
    v1::ConfigureResponse response;
    return m.stub->Configure(c, request, &response);
  });
  check_interrupts(run);
  update_job(id, [&](v1::JobStatus& j) {
    if (is_terminal(j.state())) return false;
    j.set_state(v1::RUNNING);
    j.set_step(resume.step());
    return true;
  });

  const std::filesystem::path metrics_path = std::filesystem::path(output_dir) / "metrics.jsonl";
  std::error_code ignored;
  std::filesystem::create_directories(output_dir, ignored);
  truncate_metrics_after(metrics_path, resume.step());
  std::ofstream(std::filesystem::path(output_dir) / "config.toml", std::ios::trunc)
      << spec.config_toml();
  std::ofstream metrics_file(metrics_path, std::ios::app);
  if (!metrics_file) log(id, "warning: cannot write " + metrics_path.string());
  int64_t done = resume.step();
  while (done < train.steps) {
    check_interrupts(run);
    const int64_t end = next_chunk_end(train, done, options_.max_chunk_steps);
    std::vector<int32_t> loops;
    for (int64_t s = done; s < end; ++s) {
      loops.push_back(loops_for_step(spec.schedule(), config.model.n_loops, s));
    }
    std::vector<v1::RunStepsResponse> responses(run->members.size());
    call_all(run, "RunSteps", options_.step_timeout, [&](Member& m, grpc::ClientContext* c) {
      v1::RunStepsRequest request;
      request.set_job_id(id);
      request.set_first_step(done);
      request.mutable_loops()->Add(loops.begin(), loops.end());
      return m.stub->RunSteps(c, request, &responses[&m - run->members.data()]);
    });
    for (size_t i = 0; i < responses.size(); ++i) {
      if (responses[i].steps_size() != static_cast<int>(loops.size())) {
        throw RunFailure(
            format("RunSteps on %s returned %d step report(s) for %zu step(s)",
                   run->members[i].label().c_str(), responses[i].steps_size(), loops.size()),
            {});
      }
    }
    const v1::RunStepsResponse& lead = responses[0];  // worker 0 carries the loss
    double chunk_seconds = 0;
    int64_t chunk_tokens = 0;
    for (int k = 0; k < lead.steps_size(); ++k) {
      const v1::StepReport& r = lead.steps(k);
      chunk_seconds += r.seconds();
      chunk_tokens += r.tokens();
      if (!log_due(train, r.step())) continue;
      int64_t a2a_bytes = 0;
      double a2a_seconds = 0;
      for (const v1::RunStepsResponse& resp : responses) {
        a2a_bytes += resp.steps(k).alltoall_bytes();
        a2a_seconds = std::max(a2a_seconds, resp.steps(k).alltoall_seconds());
      }
      const double tok_s = r.seconds() > 0 ? r.tokens() / r.seconds() : 0;
      metrics_file << step_record(r, tok_s);
      log(id, format("step %lld/%d loss %.4f lr %.1e grad_norm %.2f loops %d dropped %lld "
                     "tok/s %.0f a2a %.1f MB %.1f ms",
                     (long long)r.step(), train.steps, r.loss(), r.lr(), r.grad_norm(), r.loops(),
                     (long long)r.dropped(), tok_s, a2a_bytes / 1e6, a2a_seconds * 1e3));
    }
    metrics_file.flush();
    done = end;
    const double loss = lead.steps(lead.steps_size() - 1).loss();
    update_job(id, [&](v1::JobStatus& j) {
      if (is_terminal(j.state())) return false;
      j.set_step(done);
      j.set_loss(loss);
      j.set_tokens_per_s(chunk_seconds > 0 ? chunk_tokens / chunk_seconds : 0);
      return true;
    });
    metrics_.set_job_progress(id, done, loss);

    if (eval_due(train, done)) {
      std::vector<v1::EvaluateResponse> evals(run->members.size());
      call_all(run, "Evaluate", options_.step_timeout, [&](Member& m, grpc::ClientContext* c) {
        v1::EvaluateRequest request;
        request.set_job_id(id);
        request.set_batches(train.eval_batches);
        return m.stub->Evaluate(c, request, &evals[&m - run->members.data()]);
      });
      const double val_loss = evals[0].val_loss();
      log(id, format("step %lld/%d val_loss %.4f", (long long)done, train.steps, val_loss));
      metrics_file << format("{\"step\": %lld, \"val_loss\": %.17g}\n", (long long)done, val_loss);
      metrics_file.flush();
      update_job(id, [&](v1::JobStatus& j) {
        if (is_terminal(j.state())) return false;
        j.set_val_loss(val_loss);
        return true;
      });
    }
    if (checkpoint_due(train, done)) {
      v1::CheckpointMeta meta = checkpoint(run, *job, output_dir, done);
      update_job(id, [&](v1::JobStatus& j) {
        j.set_last_checkpoint_step(done);  // committed: recorded even if cancelled meanwhile
        return true;
      });
      log(id,
          format("checkpoint step %lld committed (%d files)", (long long)done, meta.files_size()));
    }
  }
  if (run->cancel) throw Cancelled{};
  shutdown_members(run, {});
  if (update_job(id, [&](v1::JobStatus& j) {
        if (is_terminal(j.state())) return false;
        j.set_state(v1::SUCCEEDED);
        return true;
      })) {
    log(id, format("succeeded after %lld steps", (long long)done));
  }
}

// ------------------------------------------------------------------------------------------------

Coordinator::Coordinator(const CoordinatorOptions& options)
    : impl_(std::make_unique<Impl>(options)) {}

Coordinator::~Coordinator() { shutdown(); }

const std::string& Coordinator::address() const { return impl_->address_; }

std::string Coordinator::metrics_address() const { return impl_->metrics_.address(); }

void Coordinator::shutdown() {
  if (impl_) impl_->shutdown();
}

}  // namespace loopmoe::service
