// Test doubles for the training-process tests: a fake ProcessRuntime (records its calls, returns
// checkable StepReports, fails on demand), and a fake Coordinator service (the KV store in a map,
// Register / Heartbeat counted), plus a helper to serve gRPC services on 127.0.0.1 port 0.
#pragma once

#include <grpcpp/server.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "process/training_process_server.h"
#include "proto/loopmoe.grpc.pb.h"
#include "runtime/process_runtime.h"

namespace loopmoe::process::testing {

// A gRPC server on 127.0.0.1 with an OS-chosen port.
struct TestServer {
  std::unique_ptr<grpc::Server> server;
  std::string address;
  ~TestServer();
};
std::unique_ptr<TestServer> serve(const std::vector<grpc::Service*>& services);

// A config the real parser accepts: 2 unique layers, 4 experts, eval_batches 5.
extern const char* const kTestConfig;

// What the fake runtimes did, shared by the factory and every runtime it made.
struct FakeRuntimeLog {
  std::mutex mutex;
  std::vector<runtime::ProcessSetup> setups;  // store pointers are dangling after the call
  std::vector<std::string> store_prefixes;    // NamespacedStore::prefix() of each setup's store
  std::vector<int> step_loops;
  std::vector<int64_t> dropped_steps;  // 0-based step of each drop_step call
  std::vector<int> evaluate_batches;
  std::vector<std::string> checkpoint_dirs;
  int runtimes_alive = 0;
  int runtimes_destroyed = 0;
  int concurrent_calls_seen = 0;  // calls that overlapped another: must stay 0

  // Behaviour, set by the test before the call.
  std::function<void()> factory_throws;  // called inside the factory if set
  int64_t comm_error_at_step = -1;       // step (1-based) whose step() throws CommError
  int64_t rollback_at_step = -1;         // step (1-based) whose step() throws PolicyRollback
  int n_layers = 2;
  int n_experts = 4;
  std::chrono::milliseconds step_sleep{0};
};

class FakeRuntime final : public runtime::ProcessRuntime {
 public:
  FakeRuntime(std::shared_ptr<FakeRuntimeLog> log, const runtime::ProcessSetup& setup);
  ~FakeRuntime() override;

  runtime::Role role() const override { return role_; }
  int rank() const override { return rank_; }
  int64_t steps_done() const override { return steps_done_; }
  // Report of step s (1-based) with R loops: loss = 10 / s, seconds = 0.5, tokens = 2048,
  // alltoall_bytes = 1000 * R, alltoall_seconds = 0.01 * R, dropped = 3, and (worker 0 only)
  // expert_tokens[a][e] = 100 * a + e + 1.
  runtime::StepReport step(int loops) override;
  // Records the step and reports it skipped, loss and gradient norm NaN.
  runtime::StepReport drop_step(int loops) override;
  double evaluate(int batches) override;  // 2.5 on workers, 0 on shards
  runtime::CheckpointFileRef checkpoint(const std::string& dir) override;
  dataloader::SamplerState sampler_state() const override;

 private:
  struct CallGuard;
  std::shared_ptr<FakeRuntimeLog> log_;
  runtime::Role role_;
  int rank_;
  int64_t steps_done_;
  std::atomic<int> in_call_{0};
};

// A factory that records the setup, publishes "hello" = "rank <r>" through the setup's store
// (so tests can see the namespace on the coordinator) and returns a FakeRuntime.
RuntimeFactory fake_factory(std::shared_ptr<FakeRuntimeLog> log);

class FakeCoordinator final : public loopmoe::v1::Coordinator::Service {
 public:
  grpc::Status KvSet(grpc::ServerContext*, const loopmoe::v1::KvSetRequest* request,
                     loopmoe::v1::KvSetResponse*) override;
  grpc::Status KvGet(grpc::ServerContext*, const loopmoe::v1::KvGetRequest* request,
                     loopmoe::v1::KvGetResponse* response) override;
  grpc::Status KvWait(grpc::ServerContext* context, const loopmoe::v1::KvWaitRequest* request,
                      loopmoe::v1::KvWaitResponse* response) override;
  grpc::Status Register(grpc::ServerContext*, const loopmoe::v1::RegisterRequest* request,
                        loopmoe::v1::RegisterResponse* response) override;
  grpc::Status Heartbeat(grpc::ServerContext*, const loopmoe::v1::HeartbeatRequest* request,
                         loopmoe::v1::HeartbeatResponse* response) override;

  std::map<std::string, std::string> kv();
  int kv_wait_calls();
  std::vector<loopmoe::v1::RegisterRequest> registrations();
  std::vector<std::string> heartbeat_ids();  // process id of every heartbeat, in order
  // Forgets every registered process, as a restarted coordinator would.
  void forget_processes();
  void set_heartbeat_interval_ms(int64_t ms) { heartbeat_interval_ms_ = ms; }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::map<std::string, std::string> kv_;
  int kv_wait_calls_ = 0;
  std::vector<loopmoe::v1::RegisterRequest> registrations_;
  std::vector<std::string> known_ids_;
  std::vector<std::string> heartbeat_ids_;
  std::atomic<int64_t> heartbeat_interval_ms_{50};
};

// Polls `condition` every 10 ms until it holds or `timeout` passes; returns the last result.
bool eventually(const std::function<bool()>& condition,
                std::chrono::milliseconds timeout = std::chrono::seconds(10));

}  // namespace loopmoe::process::testing
