#include "tests/process/fakes.h"

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <thread>

#include "comm/comm_error.h"
#include "comm/key_value_store.h"
#include "security/credentials.h"

namespace loopmoe::process::testing {

namespace pb = loopmoe::v1;
using Clock = std::chrono::steady_clock;

const char* const kTestConfig = R"([model]
n_layers = 2
n_loops = 2
n_experts = 4
top_k = 2

[train]
eval_batches = 5
)";

TestServer::~TestServer() {
  if (server) server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
}

std::unique_ptr<TestServer> serve(const std::vector<grpc::Service*>& services) {
  grpc::ServerBuilder builder;
  int port = 0;
  security::add_exclusive_listening_port(builder, "127.0.0.1:0", grpc::InsecureServerCredentials(),
                                         &port);
  for (grpc::Service* service : services) builder.RegisterService(service);
  auto result = std::make_unique<TestServer>();
  result->server = builder.BuildAndStart();
  if (!result->server || port == 0) throw std::runtime_error("test server did not start");
  result->address = "127.0.0.1:" + std::to_string(port);
  return result;
}

bool eventually(const std::function<bool()>& condition, std::chrono::milliseconds timeout) {
  const Clock::time_point deadline = Clock::now() + timeout;
  while (!condition()) {
    if (Clock::now() >= deadline) return condition();
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

// Flags calls that overlap: the server must serialise them.
struct FakeRuntime::CallGuard {
  FakeRuntime& runtime;
  explicit CallGuard(FakeRuntime& r) : runtime(r) {
    if (runtime.in_call_.fetch_add(1) != 0) {
      std::lock_guard lock(runtime.log_->mutex);
      ++runtime.log_->concurrent_calls_seen;
    }
  }
  ~CallGuard() { runtime.in_call_.fetch_sub(1); }
};

FakeRuntime::FakeRuntime(std::shared_ptr<FakeRuntimeLog> log, const runtime::ProcessSetup& setup)
    : log_(std::move(log)),
      role_(setup.role),
      rank_(setup.rank),
      steps_done_(setup.resume ? setup.resume->step : 0) {
  std::lock_guard lock(log_->mutex);
  ++log_->runtimes_alive;
}

FakeRuntime::~FakeRuntime() {
  std::lock_guard lock(log_->mutex);
  --log_->runtimes_alive;
  ++log_->runtimes_destroyed;
}

runtime::StepReport FakeRuntime::step(int loops) {
  CallGuard guard(*this);
  std::chrono::milliseconds sleep;
  int n_layers, n_experts;
  int64_t fail_at, rollback_at;
  {
    std::lock_guard lock(log_->mutex);
    log_->step_loops.push_back(loops);
    sleep = log_->step_sleep;
    n_layers = log_->n_layers;
    n_experts = log_->n_experts;
    fail_at = log_->comm_error_at_step;
    rollback_at = log_->rollback_at_step;
  }
  std::this_thread::sleep_for(sleep);
  if (steps_done_ + 1 == fail_at) {
    throw comm::CommError("comm(gloo): alltoallv on rank 0 of 3 failed: peer closed connection");
  }
  if (steps_done_ + 1 == rollback_at) {
    throw runtime::PolicyRollback(
        "step " + std::to_string(rollback_at) + ": the gradient norm is nan", steps_done_);
  }
  ++steps_done_;
  runtime::StepReport report;
  report.step = steps_done_;
  report.loops = loops;
  if (role_ == runtime::Role::kWorker) {
    report.loss = 10.0 / static_cast<double>(steps_done_);
    report.ce = report.loss - 0.5;
    report.aux = 0.4;
    report.z = 0.1;
    report.dropped = 3;
  }
  report.lr = 1e-3;
  report.grad_norm = 0.75;
  report.seconds = 0.5;
  report.alltoall_bytes = 1000 * loops;
  report.alltoall_seconds = 0.01 * loops;
  report.num_experts = n_experts;
  report.tokens = 2048;
  if (role_ == runtime::Role::kWorker && rank_ == 0) {
    for (int a = 0; a < n_layers * loops; ++a) {
      for (int e = 0; e < n_experts; ++e) report.expert_tokens.push_back(100 * a + e + 1);
    }
  }
  return report;
}

runtime::StepReport FakeRuntime::drop_step(int loops) {
  CallGuard guard(*this);
  {
    std::lock_guard lock(log_->mutex);
    log_->dropped_steps.push_back(steps_done_);
  }
  ++steps_done_;
  runtime::StepReport report;
  report.step = steps_done_;
  report.loops = loops;
  report.loss = report.grad_norm = std::numeric_limits<double>::quiet_NaN();
  report.skipped = true;
  return report;
}

double FakeRuntime::evaluate(int batches) {
  CallGuard guard(*this);
  std::lock_guard lock(log_->mutex);
  log_->evaluate_batches.push_back(batches);
  return role_ == runtime::Role::kWorker ? 2.5 : 0.0;
}

runtime::CheckpointFileRef FakeRuntime::checkpoint(const std::string& dir) {
  CallGuard guard(*this);
  std::lock_guard lock(log_->mutex);
  log_->checkpoint_dirs.push_back(dir);
  return {role_, rank_, dir + "/fake-" + std::to_string(rank_) + ".bin",
          0x1234abcdULL + static_cast<uint64_t>(steps_done_), 4096 + steps_done_};
}

dataloader::SamplerState FakeRuntime::sampler_state() const {
  return {7, 1, static_cast<uint64_t>(steps_done_) * 16};
}

RuntimeFactory fake_factory(std::shared_ptr<FakeRuntimeLog> log) {
  return [log](const runtime::ProcessSetup& setup) -> std::unique_ptr<runtime::ProcessRuntime> {
    std::function<void()> thrower;
    {
      std::lock_guard lock(log->mutex);
      log->setups.push_back(setup);
      auto* namespaced = dynamic_cast<comm::NamespacedStore*>(setup.store);
      log->store_prefixes.push_back(namespaced ? namespaced->prefix() : "<not namespaced>");
      thrower = log->factory_throws;
    }
    if (thrower) thrower();
    if (setup.store) setup.store->set("hello", "rank " + std::to_string(setup.rank));
    return std::make_unique<FakeRuntime>(log, setup);
  };
}

grpc::Status FakeCoordinator::KvSet(grpc::ServerContext*, const pb::KvSetRequest* request,
                                    pb::KvSetResponse*) {
  std::lock_guard lock(mutex_);
  kv_[request->key()] = request->value();
  changed_.notify_all();
  return grpc::Status::OK;
}

grpc::Status FakeCoordinator::KvGet(grpc::ServerContext*, const pb::KvGetRequest* request,
                                    pb::KvGetResponse* response) {
  std::lock_guard lock(mutex_);
  auto it = kv_.find(request->key());
  response->set_found(it != kv_.end());
  if (it != kv_.end()) response->set_value(it->second);
  return grpc::Status::OK;
}

grpc::Status FakeCoordinator::KvWait(grpc::ServerContext* context, const pb::KvWaitRequest* request,
                                     pb::KvWaitResponse* response) {
  const Clock::time_point deadline =
      Clock::now() + std::chrono::milliseconds(std::max<int64_t>(0, request->timeout_ms()));
  std::unique_lock lock(mutex_);
  ++kv_wait_calls_;
  auto missing = [&] {
    std::vector<std::string> result;
    for (const std::string& key : request->keys()) {
      if (!kv_.count(key)) result.push_back(key);
    }
    return result;
  };
  // Short slices so a cancelled call (server shutdown) does not hold the test up.
  while (!missing().empty() && Clock::now() < deadline && !context->IsCancelled()) {
    changed_.wait_until(lock, std::min(deadline, Clock::now() + std::chrono::milliseconds(50)));
  }
  for (const std::string& key : missing()) response->add_missing(key);
  return grpc::Status::OK;
}

grpc::Status FakeCoordinator::Register(grpc::ServerContext*, const pb::RegisterRequest* request,
                                       pb::RegisterResponse* response) {
  std::lock_guard lock(mutex_);
  registrations_.push_back(*request);
  const std::string id = "p-" + std::to_string(registrations_.size());
  known_ids_.push_back(id);
  response->set_process_id(id);
  response->set_heartbeat_interval_ms(heartbeat_interval_ms_);
  return grpc::Status::OK;
}

grpc::Status FakeCoordinator::Heartbeat(grpc::ServerContext*, const pb::HeartbeatRequest* request,
                                        pb::HeartbeatResponse* response) {
  std::lock_guard lock(mutex_);
  heartbeat_ids_.push_back(request->process_id());
  response->set_known(std::find(known_ids_.begin(), known_ids_.end(), request->process_id()) !=
                      known_ids_.end());
  return grpc::Status::OK;
}

std::map<std::string, std::string> FakeCoordinator::kv() {
  std::lock_guard lock(mutex_);
  return kv_;
}

int FakeCoordinator::kv_wait_calls() {
  std::lock_guard lock(mutex_);
  return kv_wait_calls_;
}

std::vector<pb::RegisterRequest> FakeCoordinator::registrations() {
  std::lock_guard lock(mutex_);
  return registrations_;
}

std::vector<std::string> FakeCoordinator::heartbeat_ids() {
  std::lock_guard lock(mutex_);
  return heartbeat_ids_;
}

void FakeCoordinator::forget_processes() {
  std::lock_guard lock(mutex_);
  known_ids_.clear();
}

}  // namespace loopmoe::process::testing
