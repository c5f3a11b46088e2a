// Private fixture of the coordinator service tests (test_coordinator_rpc.cc,
// test_coordinator_jobs.cc): a coordinator on 127.0.0.1 driving fake training processes.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "coordinator/coordinator.h"
#include "fake_process.h"

namespace loopmoe::coordinator::testing {

class CoordinatorTest : public ::testing::Test {
 protected:
  void SetUp() override { start(); }
  void TearDown() override {
    fakes_.clear();
    if (coordinator_) coordinator_->shutdown();
  }
  void start(std::string listen = "127.0.0.1:0") {
    CoordinatorOptions o = test_options(dir_.path);
    o.listen = listen;
    o.max_restarts = max_restarts_;
    o.metrics_listen = metrics_listen_;
    o.check_data = check_data_;
    coordinator_ = std::make_unique<Coordinator>(o);
    stub_ = testing::coordinator_stub(coordinator_->address());
  }
  FakeProcess& add(v1::Role role, FakeScript script = {}) {
    script.role = role;
    fakes_.push_back(std::make_unique<FakeProcess>(coordinator_->address(), script));
    return *fakes_.back();
  }
  v1::JobSpec spec(const std::string& config, int workers = 1, int shards = 1) {
    v1::JobSpec s;
    s.set_name("test");
    s.set_config_toml(config);
    s.set_num_workers(workers);
    s.set_num_shards(shards);
    return s;
  }
  grpc::Status submit(const v1::JobSpec& s, std::string* id) {
    grpc::ClientContext c;
    v1::SubmitJobRequest request;
    *request.mutable_spec() = s;
    v1::SubmitJobResponse response;
    grpc::Status status = stub_->SubmitJob(&c, request, &response);
    if (id) *id = response.job_id();
    return status;
  }
  std::string submit_ok(const v1::JobSpec& s) {
    std::string id;
    grpc::Status status = submit(s, &id);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return id;
  }
  v1::JobStatus job(const std::string& id) {
    grpc::ClientContext c;
    v1::GetJobRequest request;
    request.set_job_id(id);
    v1::JobStatus response;
    grpc::Status status = stub_->GetJob(&c, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response;
  }
  bool wait_state(const std::string& id, v1::JobState state,
                  std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
    const bool ok = eventually([&] { return job(id).state() == state; }, timeout);
    if (!ok) ADD_FAILURE() << "job " << id << " is " << job_state_name(job(id).state());
    return ok;
  }
  std::vector<std::string> log_lines(const std::string& id, bool follow = false) {
    grpc::ClientContext c;
    c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    v1::WatchJobRequest request;
    request.set_job_id(id);
    request.set_follow(follow);
    auto reader = stub_->WatchJob(&c, request);
    std::vector<std::string> out;
    v1::LogLine line;
    while (reader->Read(&line)) {
      EXPECT_EQ(line.line(), static_cast<int64_t>(out.size()));
      out.push_back(line.text());
    }
    grpc::Status status = reader->Finish();
    EXPECT_TRUE(status.ok()) << status.error_message();
    return out;
  }
  std::vector<v1::CheckpointMeta> checkpoints(const std::string& id) {
    grpc::ClientContext c;
    v1::ListCheckpointsRequest request;
    request.set_job_id(id);
    v1::ListCheckpointsResponse response;
    EXPECT_TRUE(stub_->ListCheckpoints(&c, request, &response).ok());
    return {response.checkpoints().begin(), response.checkpoints().end()};
  }
  static bool contains(const std::vector<std::string>& lines, const std::string& text) {
    return std::any_of(lines.begin(), lines.end(),
                       [&](const std::string& l) { return l.find(text) != std::string::npos; });
  }

  TempDir dir_;
  int max_restarts_ = 3;
  std::string metrics_listen_;
  bool check_data_ = false;
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<v1::Coordinator::Stub> stub_;
  std::vector<std::unique_ptr<FakeProcess>> fakes_;
};

}  // namespace loopmoe::coordinator::testing
