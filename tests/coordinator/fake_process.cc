#include "fake_process.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "security/credentials.h"

namespace loopmoe::coordinator::testing {

bool eventually(const std::function<bool()>& done, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return done();
}

FakeProcess::FakeProcess(const std::string& coordinator, FakeScript script,
                         const std::string& listen)
    : script_(script) {
  grpc::ServerBuilder builder;
  int port = 0;
  security::add_exclusive_listening_port(builder, listen, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(this);
  server_ = builder.BuildAndStart();
  if (!server_ || port == 0) throw std::runtime_error("fake process: cannot listen");
  address_ = listen.substr(0, listen.rfind(':') + 1) + std::to_string(port);
  if (coordinator.empty()) return;  // standalone: the test registers it (JobDriver tests)
  coordinator_ = v1::Coordinator::NewStub(
      grpc::CreateChannel(coordinator, grpc::InsecureChannelCredentials()));
  register_now();
  heartbeat_ = std::thread([this] { heartbeat_loop(); });
}

FakeProcess::~FakeProcess() {
  stop_ = true;
  if (heartbeat_.joinable()) heartbeat_.join();
  if (killer_.joinable()) killer_.join();
  server_->Shutdown(std::chrono::system_clock::now());
  server_->Wait();
}

void FakeProcess::register_now() {
  v1::RegisterRequest request;
  request.set_role(script_.role);
  request.set_address(address_);
  request.set_name("fake/" + std::to_string(getpid()));
  v1::RegisterResponse response;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  if (coordinator_->Register(&context, request, &response).ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    process_id_ = response.process_id();
    heartbeat_ms_ = response.heartbeat_interval_ms();
  }
}

void FakeProcess::heartbeat_loop() {
  while (!stop_) {
    int64_t interval;
    std::string id;
    {
      std::lock_guard<std::mutex> lock(mu_);
      interval = heartbeat_ms_;
      id = process_id_;
    }
    for (int64_t slept = 0; slept < interval && !stop_; slept += 10) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (stop_) break;
    v1::HeartbeatRequest request;
    request.set_process_id(id);
    v1::HeartbeatResponse response;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(1));
    grpc::Status s = coordinator_->Heartbeat(&context, request, &response);
    if (s.ok() && !response.known()) register_now();  // the coordinator restarted or dropped us
    if (!s.ok() || id.empty()) register_now();
  }
}

void FakeProcess::die() {
  dead_ = true;
  stop_ = true;
  server_->Shutdown(std::chrono::system_clock::now());
}

std::string FakeProcess::process_id() {
  std::lock_guard<std::mutex> lock(mu_);
  return process_id_;
}

#define FAKE_GETTER(name, member)                     \
  decltype(FakeProcess::member) FakeProcess::name() { \
    std::lock_guard<std::mutex> lock(mu_);            \
    return member;                                    \
  }
FAKE_GETTER(configures, configures_)
FAKE_GETTER(run_steps, run_steps_)
FAKE_GETTER(evaluates, evaluates_)
FAKE_GETTER(checkpoints, checkpoints_)
FAKE_GETTER(shutdowns, shutdowns_)
FAKE_GETTER(call_log, call_log_)
#undef FAKE_GETTER

grpc::Status FakeProcess::Configure(grpc::ServerContext*, const v1::ConfigureRequest* request,
                                    v1::ConfigureResponse*) {
  std::lock_guard<std::mutex> lock(mu_);
  configures_.push_back(*request);
  call_log_.push_back("Configure");
  if (request->role() != script_.role) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "wrong role");
  }
  configured_ = *request;
  steps_done_ = request->resume().step();
  return grpc::Status::OK;
}

grpc::Status FakeProcess::RunSteps(grpc::ServerContext* context, const v1::RunStepsRequest* request,
                                   v1::RunStepsResponse* response) {
  const int64_t first = request->first_step();
  const int64_t end = first + request->loops_size();
  {
    std::lock_guard<std::mutex> lock(mu_);
    run_steps_.push_back(*request);
    call_log_.push_back("RunSteps");
    if (first != steps_done_) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          "first_step " + std::to_string(first) + " does not follow step " +
                              std::to_string(steps_done_));
    }
    if (script_.fail_run_at_step >= first && script_.fail_run_at_step < end &&
        run_failures_ < script_.fail_run_times) {
      ++run_failures_;
      return grpc::Status(script_.fail_run_code,
                          "scripted failure at step " + std::to_string(script_.fail_run_at_step));
    }
    const bool dropped = std::find(request->drop_steps().begin(), request->drop_steps().end(),
                                   script_.rollback_at_step) != request->drop_steps().end();
    if (script_.rollback_at_step >= first && script_.rollback_at_step < end && !dropped) {
      v1::RunFailure detail;
      detail.set_rollback_step(script_.rollback_at_step);
      return grpc::Status(grpc::StatusCode::ABORTED,
                          "step " + std::to_string(script_.rollback_at_step + 1) +
                              ": the gradient norm is nan (train.nonfinite = \"rollback\")",
                          detail.SerializeAsString());
    }
    if (script_.die_at_step >= first && script_.die_at_step < end) {
      // Crash from another thread: Shutdown waits for this handler, which waits for the cancel.
      killer_ = std::thread([this] { die(); });
      while (!context->IsCancelled()) std::this_thread::sleep_for(std::chrono::milliseconds(2));
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "died");
    }
  }
  if (script_.step_delay.count() > 0) std::this_thread::sleep_for(script_.step_delay);
  std::lock_guard<std::mutex> lock(mu_);
  for (int i = 0; i < request->loops_size(); ++i) {
    v1::StepReport* r = response->add_steps();
    r->set_step(first + i + 1);
    r->set_loops(request->loops(i));
    const int64_t step = first + i + 1;
    const double spike = step == script_.spike_at_step ? 100.0 : 1.0;
    r->set_loss(script_.role == v1::WORKER ? spike * 10.0 / static_cast<double>(step) : 0.0);
    r->set_lr(3e-3);
    r->set_grad_norm(0.5);
    r->set_seconds(0.01);
    r->set_tokens(2048);
    r->set_alltoall_bytes(1000);
    r->set_alltoall_seconds(0.001);
    if (std::find(request->drop_steps().begin(), request->drop_steps().end(), first + i) !=
        request->drop_steps().end()) {
      r->set_skipped(true);
      r->set_loss(std::nan(""));
      r->set_grad_norm(std::nan(""));
    }
  }
  steps_done_ = end;
  return grpc::Status::OK;
}

grpc::Status FakeProcess::Evaluate(grpc::ServerContext*, const v1::EvaluateRequest* request,
                                   v1::EvaluateResponse* response) {
  std::lock_guard<std::mutex> lock(mu_);
  evaluates_.push_back(*request);
  call_log_.push_back("Evaluate@" + std::to_string(steps_done_));
  response->set_val_loss(script_.role == v1::WORKER ? 20.0 / static_cast<double>(steps_done_)
                                                    : 0.0);
  return grpc::Status::OK;
}

grpc::Status FakeProcess::Checkpoint(grpc::ServerContext*, const v1::CheckpointRequest* request,
                                     v1::CheckpointResponse* response) {
  std::lock_guard<std::mutex> lock(mu_);
  checkpoints_.push_back(*request);
  call_log_.push_back("Checkpoint@" + std::to_string(request->step()));
  if (request->step() == script_.fail_checkpoint_at_step) {
    return grpc::Status(grpc::StatusCode::INTERNAL, "scripted checkpoint failure (disk full)");
  }
  v1::CheckpointFile* f = response->mutable_file();
  f->set_role(script_.role);
  f->set_rank(configured_.rank());
  f->set_path(request->dir() + (script_.role == v1::WORKER ? "/worker-" : "/shard-") +
              std::to_string(configured_.rank()) + ".bin");
  f->set_xxh64(0x1234 + static_cast<uint64_t>(request->step()));
  f->set_bytes(4096);
  if (script_.role == v1::WORKER) {
    response->mutable_sampler()->set_seed(1234);
    response->mutable_sampler()->set_index(static_cast<uint64_t>(request->step()) * 16 +
                                           static_cast<uint64_t>(configured_.rank()));
  }
  return grpc::Status::OK;
}

grpc::Status FakeProcess::Shutdown(grpc::ServerContext*, const v1::ShutdownRequest* request,
                                   v1::ShutdownResponse*) {
  std::lock_guard<std::mutex> lock(mu_);
  shutdowns_.push_back(*request);
  call_log_.push_back("Shutdown");
  return grpc::Status::OK;
}

std::string test_config(int steps, int log_interval, int eval_interval, int checkpoint_interval) {
  return "[model]\nvocab_size = 256\nseq_len = 16\nd_model = 32\nn_heads = 2\nhead_dim = 16\n"
         "n_layers = 2\nn_loops = 2\nn_experts = 4\ntop_k = 2\nexpert_hidden = 32\n"
         "iter_adaln = \"joint\"\ncond_dim = 8\n\n[train]\nbatch_size = 2\nwarmup_steps = 1\n"
         "steps = " +
         std::to_string(steps) + "\nlog_interval = " + std::to_string(log_interval) +
         "\neval_interval = " + std::to_string(eval_interval) +
         "\ncheckpoint_interval = " + std::to_string(checkpoint_interval) +
         "\neval_batches = 3\n\n[data]\ndir = \"/nonexistent/data\"\n";
}

TempDir::TempDir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "loopmoe-coord-XXXXXX").string();
  if (mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  path = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
}

CoordinatorOptions test_options(const std::filesystem::path& data_dir) {
  CoordinatorOptions o;
  o.listen = "127.0.0.1:0";
  o.data_dir = data_dir.string();
  o.heartbeat_timeout = std::chrono::milliseconds(1000);
  o.max_restarts = 3;
  o.configure_timeout = std::chrono::seconds(10);
  o.step_timeout = std::chrono::seconds(10);
  o.shutdown_timeout = std::chrono::seconds(1);
  o.check_data = false;  // the fake processes read no data; tests that want the check set it
  // The fake processes serve plaintext; tests/security runs the coordinator secured.
  o.security = security::Credentials::Insecure();
  return o;
}

std::unique_ptr<v1::Coordinator::Stub> coordinator_stub(const std::string& address) {
  return v1::Coordinator::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
}

}  // namespace loopmoe::coordinator::testing
