// Test doubles and helpers for the coordinator tests: a fake training process (the
// TrainingProcess service, scripted: record calls, fail at a step, die, delay) that registers and
// heartbeats like a real one, and a coordinator in a temporary directory.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "coordinator/coordinator.h"
#include "proto/loopmoe.grpc.pb.h"

namespace loopmoe::coordinator::testing {

// Polls `done` every few ms until it holds or `timeout` passes.
bool eventually(const std::function<bool()>& done,
                std::chrono::milliseconds timeout = std::chrono::seconds(20));

struct FakeScript {
  v1::Role role = v1::WORKER;
  int64_t fail_run_at_step = -1;  // RunSteps covering this 0-based step fails
  int fail_run_times = 1 << 30;   // ... this many times
  grpc::StatusCode fail_run_code = grpc::StatusCode::INTERNAL;  // ... with this code
  int64_t fail_checkpoint_at_step = -1;  // Checkpoint at this step answers INTERNAL
  // RunSteps covering this 0-based step answers ABORTED with it in the details (what a process
  // does under train.nonfinite = "rollback"), unless the request drops it (drop_steps)
  int64_t rollback_at_step = -1;
  int64_t spike_at_step = -1;  // the worker's loss at this 1-based step is 100 times its usual
  int64_t die_at_step = -1;    // RunSteps covering this step kills the process
  std::chrono::milliseconds step_delay{0};  // per RunSteps call
};

class FakeProcess final : public v1::TrainingProcess::Service {
 public:
  // Registers with and heartbeats to `coordinator`; an empty one: a standalone process that does
  // neither (a test drives it directly and registers it in its own ProcessRegistry). It serves on
  // `listen`.
  FakeProcess(const std::string& coordinator, FakeScript script,
              const std::string& listen = "127.0.0.1:0");
  ~FakeProcess() override;

  // Stops heartbeating and shuts its server down at once (in-flight calls fail): a crash.
  void die();
  bool dead() const { return dead_; }
  const std::string& address() const { return address_; }
  std::string process_id();

  // Calls received, as "Configure", "RunSteps", ... with their requests.
  std::vector<v1::ConfigureRequest> configures();
  std::vector<v1::RunStepsRequest> run_steps();
  std::vector<v1::EvaluateRequest> evaluates();
  std::vector<v1::CheckpointRequest> checkpoints();
  std::vector<v1::ShutdownRequest> shutdowns();
  std::vector<std::string> call_log();  // names in order

  grpc::Status Configure(grpc::ServerContext*, const v1::ConfigureRequest* request,
                         v1::ConfigureResponse*) override;
  grpc::Status RunSteps(grpc::ServerContext* context, const v1::RunStepsRequest* request,
                        v1::RunStepsResponse* response) override;
  grpc::Status Evaluate(grpc::ServerContext*, const v1::EvaluateRequest* request,
                        v1::EvaluateResponse* response) override;
  grpc::Status Checkpoint(grpc::ServerContext*, const v1::CheckpointRequest* request,
                          v1::CheckpointResponse* response) override;
  grpc::Status Shutdown(grpc::ServerContext*, const v1::ShutdownRequest* request,
                        v1::ShutdownResponse*) override;

 private:
  void register_now();
  void heartbeat_loop();

  FakeScript script_;
  std::unique_ptr<v1::Coordinator::Stub> coordinator_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
  std::thread heartbeat_;
  std::thread killer_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> dead_{false};
  std::mutex mu_;
  std::string process_id_;
  int64_t heartbeat_ms_ = 100;
  int64_t steps_done_ = 0;
  int run_failures_ = 0;
  v1::ConfigureRequest configured_;
  std::vector<v1::ConfigureRequest> configures_;
  std::vector<v1::RunStepsRequest> run_steps_;
  std::vector<v1::EvaluateRequest> evaluates_;
  std::vector<v1::CheckpointRequest> checkpoints_;
  std::vector<v1::ShutdownRequest> shutdowns_;
  std::vector<std::string> call_log_;
};

// A small valid training config (4 experts, n_loops 2) with the given [train] overrides.
std::string test_config(int steps, int log_interval, int eval_interval, int checkpoint_interval);

// A temporary directory removed at destruction.
struct TempDir {
  TempDir();
  ~TempDir();
  std::filesystem::path path;
};

CoordinatorOptions test_options(const std::filesystem::path& data_dir);

std::unique_ptr<v1::Coordinator::Stub> coordinator_stub(const std::string& address);

}  // namespace loopmoe::coordinator::testing
