// The ServerTest fixture of the TrainingProcessServer tests (test_training_process_server*.cc):
// the server over real gRPC on 127.0.0.1, with a fake runtime and a fake coordinator store.
#pragma once

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "process/coordinator_store.h"
#include "process/process_metrics.h"
#include "process/training_process_server.h"
#include "tests/process/fakes.h"

namespace loopmoe::process::testing {

namespace pb = loopmoe::v1;

inline bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

class ServerTest : public ::testing::Test {
 protected:
  void start(runtime::Role role) {
    using namespace std::chrono_literals;
    // A second start() (another role) tears the first down in dependency order.
    stub_.reset();
    server_.reset();
    service_.reset();
    coordinator_server_ = testing::serve({&coordinator_});
    store_ = std::make_unique<CoordinatorStore>(coordinator_server_->address);
    metrics_ = std::make_unique<ProcessMetrics>(role);
    TrainingProcessOptions options;
    options.role = role;
    options.factory = testing::fake_factory(log_);
    options.rendezvous_store = store_.get();
    options.hostname = "10.1.2.3";
    options.collective_timeout = 1234ms;
    options.rendezvous_timeout = 5678ms;
    options.metrics = metrics_.get();
    options.request_exit = [this] { ++exit_requests_; };
    service_ = std::make_unique<TrainingProcessServer>(std::move(options));
    server_ = testing::serve({service_.get()});
    stub_ = pb::TrainingProcess::NewStub(
        grpc::CreateChannel(server_->address, grpc::InsecureChannelCredentials()));
  }

  void SetUp() override { start(runtime::Role::kWorker); }

  pb::ConfigureRequest configure_request(const std::string& job_id, int64_t epoch = 0) {
    pb::ConfigureRequest request;
    request.set_job_id(job_id);
    request.set_epoch(epoch);
    request.set_role(pb::WORKER);
    request.set_rank(0);
    request.set_num_workers(2);
    request.set_num_shards(3);
    request.set_config_toml(testing::kTestConfig);
    request.set_threads(2);
    request.set_rendezvous_prefix("job/" + job_id + "/epoch/" + std::to_string(epoch) + "/");
    request.set_output_dir("/tmp/out");
    return request;
  }

  grpc::Status configure(const pb::ConfigureRequest& request) {
    grpc::ClientContext context;
    pb::ConfigureResponse response;
    return stub_->Configure(&context, request, &response);
  }

  grpc::Status run_steps(const std::string& job_id, int64_t first_step,
                         const std::vector<int>& loops, pb::RunStepsResponse* response,
                         const std::vector<int64_t>& drop_steps = {}) {
    pb::RunStepsRequest request;
    request.set_job_id(job_id);
    request.set_first_step(first_step);
    for (int l : loops) request.add_loops(l);
    for (int64_t s : drop_steps) request.add_drop_steps(s);
    grpc::ClientContext context;
    return stub_->RunSteps(&context, request, response);
  }

  grpc::Status shutdown(const std::string& job_id, bool exit = false) {
    pb::ShutdownRequest request;
    request.set_job_id(job_id);
    request.set_exit(exit);
    grpc::ClientContext context;
    pb::ShutdownResponse response;
    return stub_->Shutdown(&context, request, &response);
  }

  int factory_calls() {
    std::lock_guard lock(log_->mutex);
    return static_cast<int>(log_->setups.size());
  }

  std::shared_ptr<FakeRuntimeLog> log_ = std::make_shared<FakeRuntimeLog>();
  FakeCoordinator coordinator_;
  std::unique_ptr<testing::TestServer> coordinator_server_;
  std::unique_ptr<CoordinatorStore> store_;
  std::unique_ptr<ProcessMetrics> metrics_;
  std::atomic<int> exit_requests_{0};
  std::unique_ptr<TrainingProcessServer> service_;
  std::unique_ptr<testing::TestServer> server_;
  std::unique_ptr<pb::TrainingProcess::Stub> stub_;
};

}  // namespace loopmoe::process::testing
