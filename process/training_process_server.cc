#include "process/training_process_server.h"

#include <algorithm>
#include <cstdio>
#include <exception>
#include <set>
#include <stdexcept>
#include <utility>

#include "comm/comm_error.h"
#include "dataloader/data_error.h"
#include "model/config.h"
#include "model/error.h"
#include "process/coordinator_store.h"
#include "process/roles.h"

namespace loopmoe::process {
namespace {

namespace pb = loopmoe::v1;

const char* with_article(runtime::Role role) {
  return role == runtime::Role::kWorker ? "a worker" : "an expert shard";
}

grpc::Status invalid(const std::string& message) {
  return {grpc::StatusCode::INVALID_ARGUMENT, message};
}

grpc::Status precondition(const std::string& message) {
  return {grpc::StatusCode::FAILED_PRECONDITION, message};
}

void to_proto(const runtime::StepReport& report, pb::StepReport* out) {
  out->set_step(report.step);
  out->set_loops(report.loops);
  out->set_loss(report.loss);
  out->set_ce(report.ce);
  out->set_aux(report.aux);
  out->set_z(report.z);
  out->set_dropped(report.dropped);
  out->set_lr(report.lr);
  out->set_grad_norm(report.grad_norm);
  out->set_seconds(report.seconds);
  out->set_alltoall_bytes(report.alltoall_bytes);
  out->set_alltoall_seconds(report.alltoall_seconds);
  out->set_num_experts(report.num_experts);
  out->mutable_expert_tokens()->Add(report.expert_tokens.begin(), report.expert_tokens.end());
  out->set_tokens(report.tokens);
  out->set_skipped(report.skipped);
}

// Resume point of a Configure request; the error text names the offending field.
std::optional<runtime::ResumePoint> resume_point(const pb::CheckpointMeta& meta,
                                                 std::string* error) {
  if (meta.step() < 0) {
    *error = "resume.step " + std::to_string(meta.step()) + " is negative";
    return std::nullopt;
  }
  if (meta.step() == 0) return std::nullopt;
  if (meta.files().empty()) {
    *error = "resume from step " + std::to_string(meta.step()) + " lists no checkpoint files";
    return std::nullopt;
  }
  runtime::ResumePoint resume;
  resume.step = meta.step();
  for (const pb::CheckpointFile& file : meta.files()) {
    std::optional<runtime::Role> role = from_proto(file.role());
    if (!role) {
      *error = "resume file '" + file.path() + "' has no role";
      return std::nullopt;
    }
    resume.files.push_back({*role, file.rank(), file.path(), file.xxh64(), file.bytes()});
  }
  resume.sampler = {meta.sampler().seed(), meta.sampler().epoch(), meta.sampler().index()};
  return resume;
}

}  // namespace

struct TrainingProcessServer::Job {
  std::string job_id;
  int64_t epoch = 0;
  int rank = 0;
  int eval_batches = 1;  // the config's train.eval_batches, for Evaluate with batches = 0
  // Declared before the runtime, so the runtime (which may hold on to it) goes first.
  std::unique_ptr<comm::NamespacedStore> store;
  std::unique_ptr<runtime::ProcessRuntime> runtime;
};

TrainingProcessServer::TrainingProcessServer(TrainingProcessOptions options)
    : options_(std::move(options)) {
  if (!options_.factory) throw std::invalid_argument("TrainingProcessServer: no runtime factory");
  if (!options_.rendezvous_store) {
    throw std::invalid_argument("TrainingProcessServer: no rendezvous store");
  }
}

TrainingProcessServer::~TrainingProcessServer() = default;

std::optional<std::string> TrainingProcessServer::current_job() const {
  absl::MutexLock lock(&mutex_);
  if (!job_) return std::nullopt;
  return job_->job_id;
}

std::string TrainingProcessServer::who_locked() const {
  std::string who(runtime::to_string(options_.role));
  if (job_)
    who.append(" ").append(std::to_string(job_->rank)).append(" of job ").append(job_->job_id);
  return who;
}

grpc::Status TrainingProcessServer::check_job_locked(const std::string& job_id,
                                                     const char* rpc) const {
  if (!job_) {
    return precondition(std::string(runtime::to_string(options_.role)) + ": " + rpc + " for job '" +
                        job_id + "' but this process is in no job (not configured, or it left " +
                        "after a failure)");
  }
  if (job_id != job_->job_id) {
    return precondition(who_locked() + ": " + rpc + " is for job '" + job_id + "'");
  }
  return grpc::Status::OK;
}

void TrainingProcessServer::leave_job_locked(const char* why) {
  if (!job_) return;
  std::fprintf(stderr, "%s: left the job (%s)\n", who_locked().c_str(), why);
  job_.reset();
}

grpc::Status TrainingProcessServer::runtime_failure_locked(const std::string& who,
                                                           const std::string& what,
                                                           std::exception_ptr error) {
  const std::string prefix = who + ": " + what + " failed: ";
  grpc::Status status;
  bool broken = false;
  try {
    std::rethrow_exception(std::move(error));
  } catch (const model::ConfigError& e) {
    status = invalid(prefix + e.what());
  } catch (const dataloader::DataError& e) {  // the data or a checkpoint is not what the job needs:
    status = {grpc::StatusCode::FAILED_PRECONDITION, prefix + e.what()};  // not our fault
  } catch (const model::CheckpointError& e) {
    status = {grpc::StatusCode::FAILED_PRECONDITION, prefix + e.what()};
  } catch (const runtime::PolicyRollback& e) {  // the job's policy: back to the last checkpoint
    pb::RunFailure detail;
    detail.set_rollback_step(e.step);
    status = {grpc::StatusCode::ABORTED, prefix + e.what(), detail.SerializeAsString()};
  } catch (const runtime::PolicyStop& e) {  // the job's policy: a restart cannot help
    status = {grpc::StatusCode::ABORTED, prefix + e.what()};
  } catch (const comm::TimeoutError& e) {
    status = {grpc::StatusCode::DEADLINE_EXCEEDED, prefix + e.what()};
    broken = true;
  } catch (const comm::CommError& e) {
    status = {grpc::StatusCode::UNAVAILABLE, prefix + e.what()};
    broken = true;
  } catch (const std::exception& e) {
    status = {grpc::StatusCode::INTERNAL, prefix + e.what()};
  } catch (...) {
    status = {grpc::StatusCode::INTERNAL, prefix + "unknown exception"};
  }
  std::fprintf(stderr, "%s\n", status.error_message().c_str());
  // Its peers are in an unknown state and its communicator refuses further work: only a new
  // rendezvous (the coordinator's restart with the next epoch) can continue.
  if (broken) leave_job_locked("communication failure");
  return status;
}

grpc::Status TrainingProcessServer::Configure(grpc::ServerContext* context,
                                              const pb::ConfigureRequest* request,
                                              pb::ConfigureResponse*) {
  absl::MutexLock lock(&mutex_);
  const std::optional<runtime::Role> role = from_proto(request->role());
  if (!role) return invalid("Configure: role is unspecified");
  if (*role != options_.role) {
    return precondition(std::string("Configure: this process is ") + with_article(options_.role) +
                        ", not " + with_article(*role));
  }
  if (job_ && job_->job_id == request->job_id() && request->epoch() > job_->epoch) {
    // The coordinator restarted this job (e.g. after its own restart) while we were still in
    // the old run: that run is over for everyone, join the new one.
    leave_job_locked("superseded by a newer epoch of the same job");
  }
  if (job_) {
    return precondition(who_locked() + " (epoch " + std::to_string(job_->epoch) +
                        "): cannot join job '" + request->job_id() + "' (epoch " +
                        std::to_string(request->epoch()) + ") while in a job; Shutdown first");
  }
  const std::string& job_id = request->job_id();
  if (job_id.empty() || job_id.find('/') != std::string::npos) {
    return invalid("Configure: job_id '" + job_id + "' must be non-empty and contain no '/'");
  }
  if (request->epoch() < 0) return invalid("Configure: epoch must be >= 0");
  if (request->num_workers() < 1 || request->num_shards() < 1) {
    return invalid("Configure: num_workers (" + std::to_string(request->num_workers()) +
                   ") and num_shards (" + std::to_string(request->num_shards()) + ") must be >= 1");
  }
  const int role_size =
      options_.role == runtime::Role::kWorker ? request->num_workers() : request->num_shards();
  if (request->rank() < 0 || request->rank() >= role_size) {
    return invalid("Configure: rank " + std::to_string(request->rank()) + " is not in [0, " +
                   std::to_string(role_size) + ")");
  }
  if (request->threads() < 0) return invalid("Configure: threads must be >= 0");
  if (request->config_toml().empty()) return invalid("Configure: config_toml is empty");
  model::Config config;
  try {
    config = model::parse_config(request->config_toml(), "job " + job_id + " config");
  } catch (const model::ConfigError& e) {
    return invalid(std::string("Configure: ") + e.what());
  }
  std::string resume_error;
  std::optional<runtime::ResumePoint> resume = resume_point(request->resume(), &resume_error);
  if (!resume_error.empty()) return invalid("Configure: " + resume_error);

  std::string prefix = request->rendezvous_prefix();
  if (prefix.empty()) prefix = comm::rendezvous_namespace(job_id, request->epoch());
  if (prefix.back() != '/') prefix += '/';

  auto job = std::make_unique<Job>();
  job->job_id = job_id;
  job->epoch = request->epoch();
  job->rank = request->rank();
  job->eval_batches = std::max(1, config.train.eval_batches);
  job->store = std::make_unique<comm::NamespacedStore>(*options_.rendezvous_store, prefix);

  runtime::ProcessSetup setup;
  setup.job_id = job_id;
  setup.epoch = request->epoch();
  setup.role = options_.role;
  setup.rank = request->rank();
  setup.num_workers = request->num_workers();
  setup.num_shards = request->num_shards();
  setup.config_toml = request->config_toml();
  setup.threads = request->threads() == 0 ? 1 : request->threads();
  setup.resume = std::move(resume);
  setup.store = job->store.get();
  setup.hostname = options_.hostname;
  setup.collective_timeout = options_.collective_timeout;
  setup.rendezvous_timeout = options_.rendezvous_timeout;

  try {
    // Once the coordinator has cancelled this call (it failed the run: another member died), stop
    // waiting for the others' rendezvous keys; this process must be free for the job's restart.
    const CoordinatorStore::AbandonWaitsIf cancelled(
        [context] { return context != nullptr && context->IsCancelled(); });
    job->runtime = options_.factory(setup);
  } catch (...) {
    // Still idle: job_ is only set once the runtime exists.
    return runtime_failure_locked(std::string(runtime::to_string(options_.role)) + " " +
                                      std::to_string(setup.rank) + " of job " + job_id,
                                  "joining", std::current_exception());
  }
  if (!job->runtime)
    return {grpc::StatusCode::INTERNAL, "Configure: the factory returned no runtime"};
  if (options_.metrics) {
    options_.metrics->begin_job(job_id, setup.rank, config.model.n_layers);
  }
  job_ = std::move(job);
  std::fprintf(stderr, "%s: joined (epoch %lld, %d worker(s), %d shard(s), at step %lld)\n",
               who_locked().c_str(), static_cast<long long>(job_->epoch), setup.num_workers,
               setup.num_shards, static_cast<long long>(job_->runtime->steps_done()));
  return grpc::Status::OK;
}

grpc::Status TrainingProcessServer::RunSteps(grpc::ServerContext*,
                                             const pb::RunStepsRequest* request,
                                             pb::RunStepsResponse* response) {
  absl::MutexLock lock(&mutex_);
  if (grpc::Status status = check_job_locked(request->job_id(), "RunSteps"); !status.ok()) {
    return status;
  }
  if (request->loops().empty()) return invalid(who_locked() + ": RunSteps with no steps");
  for (int loops : request->loops()) {
    if (loops < 1) {
      return invalid(who_locked() + ": RunSteps loop count " + std::to_string(loops) +
                     " must be >= 1");
    }
  }
  const int64_t done = job_->runtime->steps_done();
  if (request->first_step() != done) {
    return precondition(who_locked() + ": RunSteps first_step " +
                        std::to_string(request->first_step()) + " does not follow step " +
                        std::to_string(done) + " (the process has completed " +
                        std::to_string(done) + " steps)");
  }
  const int64_t end = request->first_step() + request->loops_size();
  const std::set<int64_t> drop(request->drop_steps().begin(), request->drop_steps().end());
  for (int64_t s : drop) {
    if (s < request->first_step() || s >= end) {
      return invalid(who_locked() + ": RunSteps drop step " + std::to_string(s) +
                     " is not among its steps " + std::to_string(request->first_step()) + ".." +
                     std::to_string(end - 1));
    }
  }
  for (int i = 0; i < request->loops_size(); ++i) {
    runtime::StepReport report;
    try {
      report = drop.count(request->first_step() + i) ? job_->runtime->drop_step(request->loops(i))
                                                     : job_->runtime->step(request->loops(i));
    } catch (...) {
      return runtime_failure_locked(who_locked(),
                                    "step " + std::to_string(request->first_step() + i + 1),
                                    std::current_exception());
    }
    if (options_.metrics) options_.metrics->record_step(report);
    to_proto(report, response->add_steps());
  }
  return grpc::Status::OK;
}

grpc::Status TrainingProcessServer::Evaluate(grpc::ServerContext*,
                                             const pb::EvaluateRequest* request,
                                             pb::EvaluateResponse* response) {
  absl::MutexLock lock(&mutex_);
  if (grpc::Status status = check_job_locked(request->job_id(), "Evaluate"); !status.ok()) {
    return status;
  }
  if (request->batches() < 0) return invalid(who_locked() + ": Evaluate batches must be >= 0");
  const int batches = request->batches() == 0 ? job_->eval_batches : request->batches();
  double val_loss = 0;
  try {
    val_loss = job_->runtime->evaluate(batches);
  } catch (...) {
    return runtime_failure_locked(who_locked(), "evaluation", std::current_exception());
  }
  if (options_.metrics) options_.metrics->record_validation_loss(val_loss);
  response->set_val_loss(val_loss);
  return grpc::Status::OK;
}

grpc::Status TrainingProcessServer::Checkpoint(grpc::ServerContext*,
                                               const pb::CheckpointRequest* request,
                                               pb::CheckpointResponse* response) {
  absl::MutexLock lock(&mutex_);
  if (grpc::Status status = check_job_locked(request->job_id(), "Checkpoint"); !status.ok()) {
    return status;
  }
  if (request->dir().empty()) return invalid(who_locked() + ": Checkpoint dir is empty");
  const int64_t done = job_->runtime->steps_done();
  if (request->step() != done) {
    return precondition(who_locked() + ": Checkpoint for step " + std::to_string(request->step()) +
                        " but the process is at step " + std::to_string(done));
  }
  runtime::CheckpointFileRef file;
  dataloader::SamplerState sampler;
  try {
    file = job_->runtime->checkpoint(request->dir());
    sampler = job_->runtime->sampler_state();
  } catch (...) {
    return runtime_failure_locked(who_locked(), "checkpoint", std::current_exception());
  }
  pb::CheckpointFile* out = response->mutable_file();
  out->set_role(to_proto(file.role));
  out->set_rank(file.rank);
  out->set_path(file.path);
  out->set_xxh64(file.xxh64);
  out->set_bytes(file.bytes);
  response->mutable_sampler()->set_seed(sampler.seed);
  response->mutable_sampler()->set_epoch(sampler.epoch);
  response->mutable_sampler()->set_index(sampler.index);
  return grpc::Status::OK;
}

grpc::Status TrainingProcessServer::Shutdown(grpc::ServerContext*,
                                             const pb::ShutdownRequest* request,
                                             pb::ShutdownResponse*) {
  absl::MutexLock lock(&mutex_);
  if (job_ && !request->job_id().empty() && request->job_id() != job_->job_id) {
    return precondition(who_locked() + ": Shutdown is for job '" + request->job_id() + "'");
  }
  leave_job_locked("shutdown requested");
  if (request->exit() && options_.request_exit) options_.request_exit();
  return grpc::Status::OK;
}

}  // namespace loopmoe::process
