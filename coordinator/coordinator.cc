// The Coordinator (coordinator.h): construction (job store, restart requeue, gRPC server, metrics,
// scheduler thread), shutdown, and the public wrapper. The implementation class is declared in
// coordinator_impl.h and spread RocksDB-style over this file, rpc_handlers.cc (the service
// methods) and scheduler.cc (the scheduler thread); each running job is driven by a JobDriver
// (job_driver.h).
#include "coordinator/coordinator.h"

#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <filesystem>

#include "coordinator/coordinator_impl.h"
#include "coordinator/util.h"
#include "security/credentials.h"

namespace loopmoe::coordinator {

using internal::job_number;
using internal::unix_ms;

Coordinator::Impl::Impl(const CoordinatorOptions& options)
    : options_(options),
      data_dir_(std::filesystem::absolute(options.data_dir).lexically_normal().string()),
      store_(data_dir_ + "/db"),
      // Ids continue from the last run's, so none held by a process from before a restart is
      // given to another (process_registry.h).
      registry_(options.heartbeat_timeout, store_.next_process_id(),
                [this](int64_t next) { store_.set_next_process_id(next); }),
      metrics_(options.metrics_listen) {
  options_.data_root =
      options.data_root.empty()
          ? data_dir_ + "/jobs"
          : std::filesystem::absolute(options.data_root).lexically_normal().string();
  if (!options.security.insecure) {
    // Checked before anything listens: the server and its calls to the processes need all four.
    if (options.security.ca_pem.empty()) {
      throw std::runtime_error("TLS needs the CA certificate (--tls-ca), or --insecure");
    }
    if (options.security.cli_token.empty() || options.security.process_token.empty()) {
      throw std::runtime_error(
          "the coordinator needs the CLI and process tokens (--cli-token-file, "
          "--process-token-file), or --insecure");
    }
  }
  requeue_after_restart();
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int port = 0;
  security::add_exclusive_listening_port(builder, options.listen,
                                         security::server_credentials(options.security), &port);
  builder.RegisterService(this);
  server_ = builder.BuildAndStart();
  if (!server_ || port == 0) {
    throw std::runtime_error("cannot listen on " + options.listen +
                             " (address in use or invalid?)");
  }
  address_ = options.listen.substr(0, options.listen.rfind(':')) + ":" + std::to_string(port);
  server_->GetHealthCheckService()->SetServingStatus(true);
  if (!options.health_listen.empty()) {
    health_ = std::make_unique<security::HealthServer>(options.health_listen);
    health_->set_serving(true);
  }
  scheduler_ = std::thread([this] { scheduler_loop(); });
}

void Coordinator::Impl::shutdown() {
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return;
    shut_down_ = true;
    stopping_ = true;
    for (auto& [id, run] : running_) run->driver->stop();
  }
  changed_.SignalAll();
  kv_.close();
  if (server_) {
    server_->GetHealthCheckService()->SetServingStatus(false);
    if (health_) health_->set_serving(false);
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  }
  if (scheduler_.joinable()) scheduler_.join();
  std::map<std::string, std::unique_ptr<RunningJob>> running;
  {
    absl::MutexLock lock(&mu_);
    running.swap(running_);
  }
  for (auto& [id, run] : running) {
    run->driver->stop();
    if (run->thread.joinable()) run->thread.join();
  }
  if (server_) server_->Wait();
  if (health_) health_->shutdown();
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
    if (job.state() == v1::QUEUED) {
      absl::MutexLock lock(&mu_);  // no other thread runs yet; taken for the annotation's sake
      queue_.insert(job_number(job.job_id()));
    }
  }
}

void Coordinator::Impl::log(const std::string& job_id, const std::string& text) {
  store_.append_log(job_id, text, unix_ms());
  changed_.SignalAll();
}

// ------------------------------------------------------------------------------------------------

Coordinator::Coordinator(const CoordinatorOptions& options)
    : impl_(std::make_unique<Impl>(options)) {}

Coordinator::~Coordinator() { shutdown(); }

const std::string& Coordinator::address() const { return impl_->address_; }

std::string Coordinator::metrics_address() const { return impl_->metrics_.address(); }

std::string Coordinator::health_address() const {
  return impl_->health_ ? impl_->health_->address() : std::string();
}

void Coordinator::shutdown() {
  if (impl_) impl_->shutdown();
}

}  // namespace loopmoe::coordinator
