// TrainingProcessServer over real gRPC, with a fake runtime and a fake coordinator store: RunSteps,
// Evaluate, Checkpoint and Shutdown once configured, a failing step, concurrent calls.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <string>
#include <thread>
#include <vector>

#include "tests/process/server_test_fixture.h"

namespace loopmoe::process {
namespace {

namespace pb = loopmoe::v1;
using namespace std::chrono_literals;
using testing::contains;
using testing::ServerTest;

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

// train.nonfinite = "rollback": the step that failed reaches the coordinator as ABORTED with the
// step in the details (pb::RunFailure); the replay's RunSteps names it in drop_steps, and the
// runtime drops it instead of computing it.
TEST_F(ServerTest, RollbackNamesTheStepAndTheReplayDropsIt) {
  {
    std::lock_guard lock(log_->mutex);
    log_->rollback_at_step = 2;
  }
  ASSERT_TRUE(configure(configure_request("j1")).ok());
  pb::RunStepsResponse response;
  grpc::Status status = run_steps("j1", 0, {1, 1, 1}, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::ABORTED);
  EXPECT_TRUE(contains(status.error_message(), "step 2 failed")) << status.error_message();
  pb::RunFailure detail;
  ASSERT_TRUE(detail.ParseFromString(status.error_details()));
  ASSERT_TRUE(detail.has_rollback_step());
  EXPECT_EQ(detail.rollback_step(), 1);

  // The replay, from the start (the coordinator configures the next epoch).
  ASSERT_TRUE(configure(configure_request("j1", 1)).ok());
  EXPECT_EQ(run_steps("j1", 0, {1, 1, 1}, &response, {3}).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT)
      << "a drop step outside the request's steps";
  response.Clear();
  ASSERT_TRUE(run_steps("j1", 0, {1, 1, 1}, &response, {1}).ok());
  ASSERT_EQ(response.steps_size(), 3);
  EXPECT_FALSE(response.steps(0).skipped());
  EXPECT_TRUE(response.steps(1).skipped());
  EXPECT_TRUE(std::isnan(response.steps(1).loss()));
  EXPECT_EQ(response.steps(1).step(), 2);
  EXPECT_FALSE(response.steps(2).skipped());
  std::lock_guard lock(log_->mutex);
  EXPECT_EQ(log_->dropped_steps, std::vector<int64_t>{1});
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
