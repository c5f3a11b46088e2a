// TrainingProcessServer over real gRPC, with a fake runtime and a fake coordinator store: Configure
// (the request mapped onto the runtime's setup, its validation, jobs and epochs, the factory's
// errors). The other RPCs are in test_training_process_server_rpcs.cc.
#include <gtest/gtest.h>

#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "comm/comm_error.h"
#include "dataloader/data_error.h"
#include "model/error.h"
#include "tests/process/server_test_fixture.h"

namespace loopmoe::process {
namespace {

namespace pb = loopmoe::v1;
using namespace std::chrono_literals;
using testing::contains;
using testing::ServerTest;

TEST_F(ServerTest, ConfigureMapsTheRequestOntoTheSetup) {
  pb::ConfigureRequest request = configure_request("j1", 2);
  request.set_rank(1);
  ASSERT_TRUE(configure(request).ok());
  EXPECT_EQ(service_->current_job(), "j1");
  std::lock_guard lock(log_->mutex);
  ASSERT_EQ(log_->setups.size(), 1u);
  const runtime::ProcessSetup& setup = log_->setups[0];
  EXPECT_EQ(setup.job_id, "j1");
  EXPECT_EQ(setup.epoch, 2);
  EXPECT_EQ(setup.role, runtime::Role::kWorker);
  EXPECT_EQ(setup.rank, 1);
  EXPECT_EQ(setup.num_workers, 2);
  EXPECT_EQ(setup.num_shards, 3);
  EXPECT_EQ(setup.config_toml, testing::kTestConfig);
  EXPECT_EQ(setup.threads, 2);
  EXPECT_FALSE(setup.resume.has_value());
  EXPECT_EQ(setup.hostname, "10.1.2.3");
  EXPECT_EQ(setup.collective_timeout, 1234ms);
  EXPECT_EQ(setup.rendezvous_timeout, 5678ms);
  EXPECT_EQ(log_->store_prefixes[0], "job/j1/epoch/2/");
  // The fake factory wrote "hello" through the setup's store: it must land namespaced on the
  // coordinator.
  EXPECT_EQ(coordinator_.kv().count("job/j1/epoch/2/hello"), 1u);
  EXPECT_EQ(coordinator_.kv().at("job/j1/epoch/2/hello"), "rank 1");
}

TEST_F(ServerTest, ConfigureDefaultsThreadsAndPrefix) {
  pb::ConfigureRequest request = configure_request("j2", 4);
  request.set_threads(0);
  request.clear_rendezvous_prefix();
  ASSERT_TRUE(configure(request).ok());
  std::lock_guard lock(log_->mutex);
  EXPECT_EQ(log_->setups[0].threads, 1);
  EXPECT_EQ(log_->store_prefixes[0], "job/j2/epoch/4/");
}

TEST_F(ServerTest, ConfigureMapsTheResumePoint) {
  pb::ConfigureRequest request = configure_request("j1", 1);
  pb::CheckpointMeta* resume = request.mutable_resume();
  resume->set_step(40);
  resume->mutable_sampler()->set_seed(11);
  resume->mutable_sampler()->set_epoch(2);
  resume->mutable_sampler()->set_index(640);
  pb::CheckpointFile* worker_file = resume->add_files();
  worker_file->set_role(pb::WORKER);
  worker_file->set_rank(0);
  worker_file->set_path("/ckpt/40/worker-0.bin");
  worker_file->set_xxh64(0xdeadbeefULL);
  worker_file->set_bytes(1000);
  pb::CheckpointFile* shard_file = resume->add_files();
  shard_file->set_role(pb::EXPERT_SHARD);
  shard_file->set_rank(1);
  shard_file->set_path("/ckpt/40/shard-1.bin");
  shard_file->set_xxh64(42);
  shard_file->set_bytes(2000);
  ASSERT_TRUE(configure(request).ok());
  {
    std::lock_guard lock(log_->mutex);
    const std::optional<runtime::ResumePoint>& point = log_->setups[0].resume;
    ASSERT_TRUE(point.has_value());
    EXPECT_EQ(point->step, 40);
    EXPECT_EQ(point->sampler.seed, 11u);
    EXPECT_EQ(point->sampler.epoch, 2u);
    EXPECT_EQ(point->sampler.index, 640u);
    ASSERT_EQ(point->files.size(), 2u);
    EXPECT_EQ(point->files[0].role, runtime::Role::kWorker);
    EXPECT_EQ(point->files[0].path, "/ckpt/40/worker-0.bin");
    EXPECT_EQ(point->files[0].xxh64, 0xdeadbeefULL);
    EXPECT_EQ(point->files[0].bytes, 1000);
    EXPECT_EQ(point->files[1].role, runtime::Role::kExpertShard);
    EXPECT_EQ(point->files[1].rank, 1);
    EXPECT_EQ(point->files[1].xxh64, 42u);
  }
  // The runtime starts at the resume step, and RunSteps must continue from there.
  pb::RunStepsResponse response;
  EXPECT_EQ(run_steps("j1", 0, {2}, &response).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  ASSERT_TRUE(run_steps("j1", 40, {2}, &response).ok());
  ASSERT_EQ(response.steps_size(), 1);
  EXPECT_EQ(response.steps(0).step(), 41);
}

TEST_F(ServerTest, ConfigureRejectsRoleMismatch) {
  pb::ConfigureRequest request = configure_request("j1");
  request.set_role(pb::EXPERT_SHARD);
  grpc::Status status = configure(request);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(contains(status.error_message(), "this process is a worker, not an expert shard"))
      << status.error_message();
  EXPECT_EQ(factory_calls(), 0);
  EXPECT_EQ(service_->current_job(), std::nullopt);
}

TEST_F(ServerTest, ShardRejectsWorkerConfiguration) {
  start(runtime::Role::kExpertShard);
  grpc::Status status = configure(configure_request("j1"));  // role WORKER
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(contains(status.error_message(), "this process is an expert shard, not a worker"))
      << status.error_message();
  pb::ConfigureRequest request = configure_request("j1");
  request.set_role(pb::EXPERT_SHARD);
  request.set_rank(2);  // of 3 shards
  EXPECT_TRUE(configure(request).ok());
}

TEST_F(ServerTest, ConfigureRejectsBadArguments) {
  std::vector<std::pair<std::string, pb::ConfigureRequest>> cases;
  auto add = [&](const std::string& expected, auto mutate) {
    pb::ConfigureRequest request = configure_request("j1");
    mutate(request);
    cases.emplace_back(expected, request);
  };
  add("rank 2", [](pb::ConfigureRequest& r) { r.set_rank(2); });  // of 2 workers
  add("rank -1", [](pb::ConfigureRequest& r) { r.set_rank(-1); });
  add("num_workers (0)", [](pb::ConfigureRequest& r) { r.set_num_workers(0); });
  add("num_shards (0)", [](pb::ConfigureRequest& r) { r.set_num_shards(0); });
  add("job_id", [](pb::ConfigureRequest& r) { r.set_job_id(""); });
  add("job_id", [](pb::ConfigureRequest& r) { r.set_job_id("a/b"); });
  add("epoch", [](pb::ConfigureRequest& r) { r.set_epoch(-1); });
  add("threads", [](pb::ConfigureRequest& r) { r.set_threads(-2); });
  add("role is unspecified", [](pb::ConfigureRequest& r) { r.set_role(pb::ROLE_UNSPECIFIED); });
  add("config_toml is empty", [](pb::ConfigureRequest& r) { r.clear_config_toml(); });
  add("unknown key model.n_layer",
      [](pb::ConfigureRequest& r) { r.set_config_toml("[model]\nn_layer = 2\n"); });
  add("lists no checkpoint files",
      [](pb::ConfigureRequest& r) { r.mutable_resume()->set_step(5); });
  for (const auto& [expected, request] : cases) {
    grpc::Status status = configure(request);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << expected;
    EXPECT_TRUE(contains(status.error_message(), expected))
        << "expected '" << expected << "' in: " << status.error_message();
  }
  EXPECT_EQ(factory_calls(), 0);
  EXPECT_EQ(service_->current_job(), std::nullopt);
}

TEST_F(ServerTest, SecondConfigureWhileInAJobIsRejected) {
  ASSERT_TRUE(configure(configure_request("j1")).ok());
  grpc::Status status = configure(configure_request("j2"));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(contains(status.error_message(), "job j1")) << status.error_message();
  EXPECT_TRUE(contains(status.error_message(), "'j2'")) << status.error_message();
  EXPECT_EQ(factory_calls(), 1);
  EXPECT_EQ(service_->current_job(), "j1");
  // The same job at the same epoch again is a duplicate, also rejected.
  EXPECT_EQ(configure(configure_request("j1")).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
}

// After a coordinator restart the job comes back with a higher epoch while this process is still
// in the old run: the new run replaces it.
TEST_F(ServerTest, NewerEpochOfTheSameJobReplacesTheOldRun) {
  ASSERT_TRUE(configure(configure_request("j1", 0)).ok());
  grpc::Status status = configure(configure_request("j1", 1));
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(factory_calls(), 2);
  EXPECT_EQ(service_->current_job(), "j1");
  EXPECT_EQ(configure(configure_request("j1", 0)).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);  // an older epoch never wins
}

TEST_F(ServerTest, FactoryExceptionsMapToStatusesAndLeaveTheProcessIdle) {
  struct Case {
    std::function<void()> thrower;
    grpc::StatusCode code;
    std::string text;
  };
  const std::vector<Case> cases = {
      {[] { throw model::ConfigError("model.n_experts = 2 < num_shards = 3"); },
       grpc::StatusCode::INVALID_ARGUMENT, "model.n_experts = 2 < num_shards = 3"},
      {[] { throw comm::CommError("gloo: connect to 10.0.0.9 refused"); },
       grpc::StatusCode::UNAVAILABLE, "connect to 10.0.0.9 refused"},
      {[] { throw comm::TimeoutError("waiting for 1 key(s): 'gloo/world/2'"); },
       grpc::StatusCode::DEADLINE_EXCEEDED, "'gloo/world/2'"},
      {[] { throw dataloader::DataError("data/sotu/train.bin: no such file"); },
       grpc::StatusCode::FAILED_PRECONDITION, "train.bin: no such file"},
      {[] { throw model::CheckpointError("ckpt/worker-0.bin: checksum mismatch"); },
       grpc::StatusCode::FAILED_PRECONDITION, "checksum mismatch"},
      {[] { throw std::runtime_error("std::bad_alloc"); }, grpc::StatusCode::INTERNAL,
       "std::bad_alloc"},
  };
  for (const Case& c : cases) {
    {
      std::lock_guard lock(log_->mutex);
      log_->factory_throws = c.thrower;
    }
    grpc::Status status = configure(configure_request("j1"));
    EXPECT_EQ(status.error_code(), c.code) << c.text;
    EXPECT_TRUE(contains(status.error_message(), c.text)) << status.error_message();
    EXPECT_TRUE(contains(status.error_message(), "worker 0 of job j1")) << status.error_message();
    EXPECT_EQ(service_->current_job(), std::nullopt);
  }
  {
    std::lock_guard lock(log_->mutex);
    log_->factory_throws = nullptr;
  }
  EXPECT_TRUE(configure(configure_request("j1", 1)).ok());
}

}  // namespace
}  // namespace loopmoe::process
