// TrainingProcessServer over real gRPC, with a fake runtime and a fake coordinator store.
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <gtest/gtest.h>

#include <thread>

#include "comm/comm_error.h"
#include "dataloader/data_error.h"
#include "model/error.h"
#include "process/coordinator_store.h"
#include "process/process_metrics.h"
#include "process/training_process_server.h"
#include "tests/process/fakes.h"

namespace loopmoe::process {
namespace {

namespace pb = loopmoe::v1;
using namespace std::chrono_literals;
using testing::FakeCoordinator;
using testing::FakeRuntimeLog;

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

class ServerTest : public ::testing::Test {
 protected:
  void start(runtime::Role role) {
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
                         const std::vector<int>& loops, pb::RunStepsResponse* response) {
    pb::RunStepsRequest request;
    request.set_job_id(job_id);
    request.set_first_step(first_step);
    for (int l : loops) request.add_loops(l);
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
      {[] { throw ConfigError("model.n_experts = 2 < num_shards = 3"); },
       grpc::StatusCode::INVALID_ARGUMENT, "model.n_experts = 2 < num_shards = 3"},
      {[] { throw comm::CommError("gloo: connect to 10.0.0.9 refused"); },
       grpc::StatusCode::UNAVAILABLE, "connect to 10.0.0.9 refused"},
      {[] { throw comm::TimeoutError("waiting for 1 key(s): 'gloo/world/2'"); },
       grpc::StatusCode::DEADLINE_EXCEEDED, "'gloo/world/2'"},
      {[] { throw data::DataError("data/sotu/train.bin: no such file"); },
       grpc::StatusCode::FAILED_PRECONDITION, "train.bin: no such file"},
      {[] { throw CheckpointError("ckpt/worker-0.bin: checksum mismatch"); },
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

TEST_F(ServerTest, RunStepsPassesLoopsAndReturnsReports) {
  ASSERT_TRUE(configure(configure_request("j1")).ok());
  pb::RunStepsResponse response;
  ASSERT_TRUE(run_steps("j1", 0, {1, 3, 2}, &response).ok());
  {
    std::lock_guard lock(log_->mutex);
    EXPECT_EQ(log_->step_loops, (std::vector<int>{1, 3, 2}));
  }
  ASSERT_EQ(response.steps_size(), 3);
  const int loops[] = {1, 3, 2};
  for (int i = 0; i < 3; ++i) {
    const pb::StepReport& step = response.steps(i);
    EXPECT_EQ(step.step(), i + 1);
    EXPECT_EQ(step.loops(), loops[i]);
    EXPECT_DOUBLE_EQ(step.loss(), 10.0 / (i + 1));
    EXPECT_DOUBLE_EQ(step.ce(), 10.0 / (i + 1) - 0.5);
    EXPECT_DOUBLE_EQ(step.aux(), 0.4);
    EXPECT_DOUBLE_EQ(step.z(), 0.1);
    EXPECT_EQ(step.dropped(), 3);
    EXPECT_DOUBLE_EQ(step.lr(), 1e-3);
    EXPECT_DOUBLE_EQ(step.grad_norm(), 0.75);
    EXPECT_DOUBLE_EQ(step.seconds(), 0.5);
    EXPECT_EQ(step.alltoall_bytes(), 1000 * loops[i]);
    EXPECT_DOUBLE_EQ(step.alltoall_seconds(), 0.01 * loops[i]);
    EXPECT_EQ(step.num_experts(), 4);
    EXPECT_EQ(step.tokens(), 2048);
    ASSERT_EQ(step.expert_tokens_size(), 2 * loops[i] * 4);
    EXPECT_EQ(step.expert_tokens(5), 100 * 1 + 1 + 1);  // application 1, expert 1
  }
  // Every report went to the metrics.
  const std::string metrics = metrics_->text();
  EXPECT_TRUE(
      contains(metrics, "loopmoe_steps_total{role=\"worker\",job_id=\"j1\",rank=\"0\"} 3\n"))
      << metrics;
  EXPECT_TRUE(contains(metrics,
                       "loopmoe_alltoall_bytes_total{role=\"worker\",job_id=\"j1\","
                       "rank=\"0\"} 6000\n"))
      << metrics;
  // The next call continues where this one ended.
  ASSERT_TRUE(run_steps("j1", 3, {2}, &response).ok());
}

TEST_F(ServerTest, RunStepsRejectsWrongJobStepAndLoops) {
  pb::RunStepsResponse response;
  grpc::Status idle = run_steps("j1", 0, {1}, &response);
  EXPECT_EQ(idle.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(contains(idle.error_message(), "in no job")) << idle.error_message();

  ASSERT_TRUE(configure(configure_request("j1")).ok());
  grpc::Status wrong_job = run_steps("j9", 0, {1}, &response);
  EXPECT_EQ(wrong_job.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(contains(wrong_job.error_message(), "'j9'")) << wrong_job.error_message();

  grpc::Status wrong_step = run_steps("j1", 5, {1}, &response);
  EXPECT_EQ(wrong_step.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(contains(wrong_step.error_message(), "first_step 5 does not follow step 0"))
      << wrong_step.error_message();

  EXPECT_EQ(run_steps("j1", 0, {}, &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(run_steps("j1", 0, {2, 0}, &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  std::lock_guard lock(log_->mutex);
  EXPECT_TRUE(log_->step_loops.empty());
}

TEST_F(ServerTest, EvaluateAndCheckpointPassThrough) {
  ASSERT_TRUE(configure(configure_request("j1")).ok());
  pb::RunStepsResponse steps;
  ASSERT_TRUE(run_steps("j1", 0, {2, 2}, &steps).ok());

  pb::EvaluateRequest evaluate;
  evaluate.set_job_id("j1");
  evaluate.set_batches(3);
  pb::EvaluateResponse evaluated;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub_->Evaluate(&context, evaluate, &evaluated).ok());
  }
  EXPECT_DOUBLE_EQ(evaluated.val_loss(), 2.5);
  EXPECT_TRUE(contains(metrics_->text(),
                       "loopmoe_validation_loss{role=\"worker\",job_id=\"j1\",rank=\"0\"} 2.5\n"))
      << metrics_->text();
  evaluate.set_batches(0);  // the config's train.eval_batches (5)
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub_->Evaluate(&context, evaluate, &evaluated).ok());
  }
  {
    std::lock_guard lock(log_->mutex);
    EXPECT_EQ(log_->evaluate_batches, (std::vector<int>{3, 5}));
  }

  pb::CheckpointRequest checkpoint;
  checkpoint.set_job_id("j1");
  checkpoint.set_step(2);
  checkpoint.set_dir("/shared/ckpt/j1/step-2");
  pb::CheckpointResponse written;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub_->Checkpoint(&context, checkpoint, &written).ok());
  }
  EXPECT_EQ(written.file().role(), pb::WORKER);
  EXPECT_EQ(written.file().rank(), 0);
  EXPECT_EQ(written.file().path(), "/shared/ckpt/j1/step-2/fake-0.bin");
  EXPECT_EQ(written.file().xxh64(), 0x1234abcdULL + 2);
  EXPECT_EQ(written.file().bytes(), 4096 + 2);
  EXPECT_EQ(written.sampler().seed(), 7u);
  EXPECT_EQ(written.sampler().epoch(), 1u);
  EXPECT_EQ(written.sampler().index(), 32u);

  checkpoint.set_step(1);  // not the step the process is at
  {
    grpc::ClientContext context;
    grpc::Status status = stub_->Checkpoint(&context, checkpoint, &written);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_TRUE(contains(status.error_message(), "at step 2")) << status.error_message();
  }
  std::lock_guard lock(log_->mutex);
  EXPECT_EQ(log_->checkpoint_dirs, (std::vector<std::string>{"/shared/ckpt/j1/step-2"}));
}

TEST_F(ServerTest, ShutdownGoesIdleAndAllowsTheNextJob) {
  ASSERT_TRUE(configure(configure_request("j1")).ok());
  grpc::Status other = shutdown("j2");
  EXPECT_EQ(other.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(service_->current_job(), "j1");

  ASSERT_TRUE(shutdown("j1").ok());
  EXPECT_EQ(service_->current_job(), std::nullopt);
  {
    std::lock_guard lock(log_->mutex);
    EXPECT_EQ(log_->runtimes_alive, 0);
    EXPECT_EQ(log_->runtimes_destroyed, 1);
  }
  pb::RunStepsResponse response;
  EXPECT_EQ(run_steps("j1", 0, {1}, &response).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(shutdown("j1").ok()) << "Shutdown when idle is a no-op";
  EXPECT_EQ(exit_requests_, 0);

  ASSERT_TRUE(configure(configure_request("j2")).ok());
  ASSERT_TRUE(run_steps("j2", 0, {1}, &response).ok());
  ASSERT_TRUE(shutdown("", /*exit=*/true).ok());  // empty job id: whatever job it is in
  EXPECT_EQ(service_->current_job(), std::nullopt);
  EXPECT_EQ(exit_requests_, 1);
}

TEST_F(ServerTest, CommErrorInAStepDropsTheRuntime) {
  {
    std::lock_guard lock(log_->mutex);
    log_->comm_error_at_step = 2;
  }
  ASSERT_TRUE(configure(configure_request("j1")).ok());
  pb::RunStepsResponse response;
  grpc::Status status = run_steps("j1", 0, {1, 1, 1}, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(contains(status.error_message(), "step 2 failed")) << status.error_message();
  EXPECT_TRUE(contains(status.error_message(), "peer closed connection")) << status.error_message();
  EXPECT_EQ(service_->current_job(), std::nullopt);
  {
    std::lock_guard lock(log_->mutex);
    EXPECT_EQ(log_->runtimes_alive, 0);
    EXPECT_EQ(log_->step_loops.size(), 2u) << "no step after the failed one";
    log_->comm_error_at_step = -1;
  }
  // The coordinator restarts the job with the next epoch: the process can join it.
  ASSERT_TRUE(configure(configure_request("j1", 1)).ok());
  ASSERT_TRUE(run_steps("j1", 0, {1}, &response).ok());
}

TEST_F(ServerTest, ConcurrentRpcsAreSerialised) {
  {
    std::lock_guard lock(log_->mutex);
    log_->step_sleep = 20ms;
  }
  ASSERT_TRUE(configure(configure_request("j1")).ok());
  std::atomic<int> ok{0};
  std::vector<std::thread> callers;
  for (int t = 0; t < 4; ++t) {
    callers.emplace_back([&] {
      pb::EvaluateRequest request;
      request.set_job_id("j1");
      request.set_batches(1);
      for (int i = 0; i < 5; ++i) {
        pb::EvaluateResponse response;
        grpc::ClientContext context;
        if (stub_->Evaluate(&context, request, &response).ok()) ++ok;
      }
    });
  }
  pb::RunStepsResponse response;
  EXPECT_TRUE(run_steps("j1", 0, std::vector<int>(10, 1), &response).ok());
  for (std::thread& caller : callers) caller.join();
  EXPECT_EQ(ok, 20);
  std::lock_guard lock(log_->mutex);
  EXPECT_EQ(log_->concurrent_calls_seen, 0);
}

}  // namespace
}  // namespace loopmoe::process
