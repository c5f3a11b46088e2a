// The coordinator running jobs on fake training processes over real gRPC on 127.0.0.1: schedules,
// checkpoints, failures and restarts, cancellation, and a restart of the coordinator itself.
#include <gtest/gtest.h>

#include <chrono>
#include <set>
#include <string>
#include <vector>

#include "coordinator/coordinator.h"
#include "coordinator/job_spec.h"
#include "coordinator/job_store.h"
#include "coordinator_fixture.h"

namespace loopmoe::coordinator {
namespace {

using testing::CoordinatorTest;
using testing::eventually;
using testing::FakeProcess;
using testing::FakeScript;
using testing::test_config;

TEST_F(CoordinatorTest, RunsFixedScheduleToSuccess) {
  FakeProcess& w0 = add(v1::WORKER);
  FakeProcess& w1 = add(v1::WORKER);
  FakeProcess& s0 = add(v1::EXPERT_SHARD);
  const std::string id = submit_ok(spec(test_config(20, 5, 10, 10), 2, 1));
  EXPECT_EQ(id, "1");
  // Follow the log while it runs: the stream ends when the job does.
  std::vector<std::string> followed = log_lines(id, /*follow=*/true);
  v1::JobStatus st = job(id);
  ASSERT_EQ(st.state(), v1::SUCCEEDED) << st.error();
  EXPECT_EQ(st.step(), 20);
  EXPECT_EQ(st.total_steps(), 20);
  EXPECT_DOUBLE_EQ(st.loss(), 10.0 / 20);
  EXPECT_DOUBLE_EQ(st.val_loss(), 20.0 / 20);
  EXPECT_EQ(st.last_checkpoint_step(), 20);
  EXPECT_NEAR(st.tokens_per_s(), 2048 / 0.01, 1e-6);
  ASSERT_EQ(st.process_ids_size(), 3);
  EXPECT_EQ(st.process_ids(0), w0.process_id());
  EXPECT_EQ(st.process_ids(1), w1.process_id());
  EXPECT_EQ(st.process_ids(2), s0.process_id());

  for (FakeProcess* p : {&w0, &w1, &s0}) {
    ASSERT_EQ(p->configures().size(), 1u);
    const v1::ConfigureRequest cfg = p->configures()[0];
    EXPECT_EQ(cfg.job_id(), id);
    EXPECT_EQ(cfg.epoch(), 0);
    EXPECT_EQ(cfg.num_workers(), 2);
    EXPECT_EQ(cfg.num_shards(), 1);
    EXPECT_EQ(cfg.threads(), 1);
    EXPECT_EQ(cfg.rendezvous_prefix(), "job/1/epoch/0/");
    EXPECT_EQ(cfg.output_dir(), (dir_.path / "jobs" / "1").string());
    EXPECT_EQ(cfg.resume().step(), 0);
    std::vector<v1::RunStepsRequest> runs = p->run_steps();
    ASSERT_EQ(runs.size(), 4u);
    for (size_t i = 0; i < runs.size(); ++i) {
      EXPECT_EQ(runs[i].first_step(), static_cast<int64_t>(i) * 5);
      ASSERT_EQ(runs[i].loops_size(), 5);
      for (int32_t r : runs[i].loops()) EXPECT_EQ(r, 2);  // model.n_loops
    }
    EXPECT_EQ(p->call_log(),
              (std::vector<std::string>{"Configure", "RunSteps", "RunSteps", "Evaluate@10",
                                        "Checkpoint@10", "RunSteps", "RunSteps", "Evaluate@20",
                                        "Checkpoint@20", "Shutdown"}));
    EXPECT_EQ(p->evaluates()[0].batches(), 3);
    EXPECT_EQ(p->checkpoints()[0].dir(),
              (dir_.path / "jobs" / "1" / "checkpoints" / "step-00000010").string());
    EXPECT_FALSE(p->shutdowns()[0].exit());
  }
  EXPECT_EQ(w1.configures()[0].rank(), 1);
  EXPECT_EQ(s0.configures()[0].role(), v1::EXPERT_SHARD);
  EXPECT_EQ(s0.configures()[0].rank(), 0);

  std::vector<v1::CheckpointMeta> ckpts = checkpoints(id);
  ASSERT_EQ(ckpts.size(), 2u);
  EXPECT_EQ(ckpts[0].step(), 10);
  EXPECT_EQ(ckpts[1].step(), 20);
  const v1::CheckpointMeta& m = ckpts[0];
  ASSERT_EQ(m.files_size(), 3);
  EXPECT_EQ(m.files(0).role(), v1::WORKER);
  EXPECT_EQ(m.files(1).rank(), 1);
  EXPECT_EQ(m.files(2).role(), v1::EXPERT_SHARD);
  EXPECT_NE(m.files(2).path().find("step-00000010/shard-0.bin"), std::string::npos);
  EXPECT_EQ(m.sampler().index(), 10u * 16);  // worker 0's
  EXPECT_NE(m.config_hash(), 0u);
  EXPECT_EQ(m.config_hash(), ckpts[1].config_hash());
  EXPECT_EQ(m.num_workers(), 2);
  EXPECT_EQ(m.num_shards(), 1);
  EXPECT_EQ(m.threads(), 1);
  EXPECT_GT(m.created_unix_ms(), 0);

  std::vector<std::string> lines = log_lines(id);
  EXPECT_EQ(lines, followed);
  EXPECT_TRUE(contains(lines,
                       "step 5/20 loss 2.0000 lr 3.0e-03 grad_norm 0.50 loops 2 dropped 0 "
                       "tok/s 204800 a2a 0.0 MB 1.0 ms"));
  EXPECT_TRUE(contains(lines, "step 10/20 val_loss 2.0000"));
  EXPECT_TRUE(contains(lines, "checkpoint step 10 committed (3 files)"));
  EXPECT_TRUE(contains(lines, "succeeded after 20 steps"));

  // The processes are idle again: a second job runs on them.
  const std::string second = submit_ok(spec(test_config(5, 5, 0, 0), 1, 1));
  ASSERT_TRUE(wait_state(second, v1::SUCCEEDED));
  EXPECT_EQ(w0.configures().size(), 2u);
}

TEST_F(CoordinatorTest, ListAndUniformSchedulesAndChunkCap) {
  FakeProcess& w = add(v1::WORKER);
  add(v1::EXPERT_SHARD);
  v1::JobSpec list = spec(test_config(120, 1000, 0, 0));
  list.mutable_schedule()->set_kind(v1::LoopSchedule::LIST);
  for (int r : {1, 2, 3}) list.mutable_schedule()->add_loops(r);
  const std::string a = submit_ok(list);
  ASSERT_TRUE(wait_state(a, v1::SUCCEEDED));
  std::vector<v1::RunStepsRequest> runs = w.run_steps();
  ASSERT_EQ(runs.size(), 3u);  // at most 50 steps per chunk
  EXPECT_EQ(runs[0].loops_size(), 50);
  EXPECT_EQ(runs[1].first_step(), 50);
  EXPECT_EQ(runs[2].first_step(), 100);
  EXPECT_EQ(runs[2].loops_size(), 20);
  for (const auto& run : runs) {
    for (int i = 0; i < run.loops_size(); ++i) {
      EXPECT_EQ(run.loops(i), 1 + (run.first_step() + i) % 3);
    }
  }
  // Only the end is evaluated and checkpointed when the intervals are 0.
  EXPECT_EQ(w.evaluates().size(), 1u);
  EXPECT_EQ(checkpoints(a).size(), 1u);

  v1::JobSpec uniform = spec(test_config(40, 1000, 0, 0));
  uniform.mutable_schedule()->set_kind(v1::LoopSchedule::UNIFORM);
  uniform.mutable_schedule()->set_min_loops(1);
  uniform.mutable_schedule()->set_max_loops(4);
  uniform.mutable_schedule()->set_seed(99);
  std::vector<int32_t> drawn[2];
  for (int k = 0; k < 2; ++k) {
    const size_t before = w.run_steps().size();
    const std::string id = submit_ok(uniform);
    ASSERT_TRUE(wait_state(id, v1::SUCCEEDED));
    std::vector<v1::RunStepsRequest> r = w.run_steps();
    ASSERT_EQ(r.size(), before + 1);
    drawn[k].assign(r.back().loops().begin(), r.back().loops().end());
  }
  EXPECT_EQ(drawn[0], drawn[1]);  // deterministic
  ASSERT_EQ(drawn[0].size(), 40u);
  for (int64_t i = 0; i < 40; ++i) {
    EXPECT_EQ(drawn[0][i], loops_for_step(uniform.schedule(), 2, i));
  }
  EXPECT_GT(std::set<int32_t>(drawn[0].begin(), drawn[0].end()).size(), 2u);
}

TEST_F(CoordinatorTest, FailedCheckpointIsNotCommitted) {
  max_restarts_ = 0;
  coordinator_.reset();
  start();
  add(v1::WORKER);
  FakeScript bad;
  bad.fail_checkpoint_at_step = 10;
  add(v1::EXPERT_SHARD, bad);
  const std::string id = submit_ok(spec(test_config(20, 5, 10, 10)));
  ASSERT_TRUE(wait_state(id, v1::FAILED));
  EXPECT_TRUE(checkpoints(id).empty());
  v1::JobStatus st = job(id);
  EXPECT_EQ(st.last_checkpoint_step(), 0);
  EXPECT_NE(st.error().find("Checkpoint on shard-"), std::string::npos) << st.error();
  EXPECT_NE(st.error().find("scripted checkpoint failure (disk full)"), std::string::npos);
  EXPECT_NE(st.error().find("after 0 restart(s)"), std::string::npos) << st.error();
  std::vector<std::string> lines = log_lines(id);
  EXPECT_TRUE(contains(lines, "failed: out of restarts"));
  EXPECT_FALSE(contains(lines, "committed"));
}

TEST_F(CoordinatorTest, FailureRestartsFromLastCommittedCheckpoint) {
  FakeScript flaky;
  flaky.fail_run_at_step = 12;
  flaky.fail_run_times = 1;
  FakeProcess& w = add(v1::WORKER, flaky);
  FakeProcess& s = add(v1::EXPERT_SHARD);
  const std::string id = submit_ok(spec(test_config(20, 5, 10, 10)));
  ASSERT_TRUE(wait_state(id, v1::SUCCEEDED));
  v1::JobStatus st = job(id);
  EXPECT_EQ(st.epoch(), 1);
  for (FakeProcess* p : {&w, &s}) {
    std::vector<v1::ConfigureRequest> cfgs = p->configures();
    ASSERT_EQ(cfgs.size(), 2u);
    EXPECT_EQ(cfgs[1].epoch(), 1);
    EXPECT_EQ(cfgs[1].rendezvous_prefix(), "job/1/epoch/1/");
    EXPECT_EQ(cfgs[1].resume().step(), 10);
    EXPECT_EQ(cfgs[1].resume().files_size(), 2);
    EXPECT_EQ(cfgs[1].resume().sampler().index(), 160u);
    std::vector<v1::RunStepsRequest> runs = p->run_steps();
    ASSERT_GE(runs.size(), 2u);
    EXPECT_EQ(runs[runs.size() - 2].first_step(), 10);  // after the restart: 10..15, 15..20
    EXPECT_EQ(runs.back().first_step(), 15);
  }
  // The survivor was told to leave the failed run.
  EXPECT_GE(s.shutdowns().size(), 2u);
  std::vector<std::string> lines = log_lines(id);
  EXPECT_TRUE(contains(lines, "error: RunSteps on worker-1 (worker 0 at "));
  EXPECT_TRUE(contains(lines, "scripted failure at step 12"));
  EXPECT_TRUE(contains(lines, "restarting as epoch 1"));
  EXPECT_TRUE(contains(lines, "resuming from step 10"));
  EXPECT_EQ(checkpoints(id).size(), 2u);
}

TEST_F(CoordinatorTest, DeadProcessIsReplacedAndJobResumes) {
  add(v1::WORKER);
  FakeScript dies;
  dies.die_at_step = 12;
  FakeProcess& doomed = add(v1::EXPERT_SHARD, dies);
  const std::string id = submit_ok(spec(test_config(20, 5, 10, 10)));
  ASSERT_TRUE(eventually([&] { return job(id).epoch() == 1; }));
  EXPECT_TRUE(doomed.dead());
  // No shard left: the job waits in the queue.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(job(id).state(), v1::QUEUED);
  FakeProcess& fresh = add(v1::EXPERT_SHARD);
  ASSERT_TRUE(wait_state(id, v1::SUCCEEDED));
  ASSERT_EQ(fresh.configures().size(), 1u);
  EXPECT_EQ(fresh.configures()[0].resume().step(), 10);
  EXPECT_EQ(fresh.configures()[0].epoch(), 1);
  v1::JobStatus st = job(id);
  EXPECT_EQ(st.process_ids(1), fresh.process_id());
}

TEST_F(CoordinatorTest, OutOfRestartsFails) {
  max_restarts_ = 2;
  coordinator_.reset();
  start();
  FakeScript broken;
  broken.fail_run_at_step = 3;
  FakeProcess& w = add(v1::WORKER, broken);
  add(v1::EXPERT_SHARD);
  const std::string id = submit_ok(spec(test_config(20, 5, 10, 10)));
  ASSERT_TRUE(wait_state(id, v1::FAILED));
  v1::JobStatus st = job(id);
  EXPECT_EQ(st.epoch(), 2);
  EXPECT_NE(st.error().find("scripted failure at step 3"), std::string::npos) << st.error();
  EXPECT_NE(st.error().find("after 2 restart(s)"), std::string::npos) << st.error();
  EXPECT_EQ(w.configures().size(), 3u);
}

TEST_F(CoordinatorTest, CancelQueuedJob) {
  const std::string id = submit_ok(spec(test_config(20, 5, 10, 10)));
  EXPECT_EQ(job(id).state(), v1::QUEUED);  // no processes
  grpc::ClientContext c;
  v1::CancelJobRequest r;
  r.set_job_id(id);
  v1::JobStatus st;
  ASSERT_TRUE(stub_->CancelJob(&c, r, &st).ok());
  EXPECT_EQ(st.state(), v1::CANCELLED);
  grpc::ClientContext again;
  grpc::Status s = stub_->CancelJob(&again, r, &st);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(s.error_message(), "job 1 has already cancelled");
  // Processes arriving later do not run it.
  FakeProcess& w = add(v1::WORKER);
  add(v1::EXPERT_SHARD);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_TRUE(w.configures().empty());
  EXPECT_EQ(job(id).state(), v1::CANCELLED);
}

TEST_F(CoordinatorTest, CancelRunningJob) {
  FakeScript slow;
  slow.step_delay = std::chrono::milliseconds(30);
  FakeProcess& w = add(v1::WORKER, slow);
  add(v1::EXPERT_SHARD, slow);
  const std::string id = submit_ok(spec(test_config(10000, 5, 0, 0)));
  ASSERT_TRUE(eventually([&] { return job(id).step() >= 10; }));
  grpc::ClientContext c;
  v1::CancelJobRequest r;
  r.set_job_id(id);
  v1::JobStatus st;
  ASSERT_TRUE(stub_->CancelJob(&c, r, &st).ok());
  EXPECT_EQ(st.state(), v1::CANCELLED);
  ASSERT_TRUE(eventually([&] { return !w.shutdowns().empty(); }));
  const size_t runs = w.run_steps().size();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_EQ(w.run_steps().size(), runs);  // nothing after the shutdown
  EXPECT_EQ(w.call_log().back(), "Shutdown");
  EXPECT_EQ(w.shutdowns()[0].job_id(), id);
  EXPECT_LT(job(id).step(), 10000);
  EXPECT_EQ(job(id).state(), v1::CANCELLED);
  EXPECT_TRUE(contains(log_lines(id), "cancelled at step"));
  // The processes are free for the next job.
  const std::string next = submit_ok(spec(test_config(5, 5, 0, 0)));
  ASSERT_TRUE(wait_state(next, v1::SUCCEEDED));
}

TEST_F(CoordinatorTest, CoordinatorRestartRequeuesRunningJob) {
  FakeScript slow;
  slow.step_delay = std::chrono::milliseconds(20);
  FakeProcess& w = add(v1::WORKER, slow);
  add(v1::EXPERT_SHARD, slow);
  const std::string id = submit_ok(spec(test_config(60, 5, 0, 10)));
  ASSERT_TRUE(eventually([&] { return job(id).last_checkpoint_step() >= 10; }));
  const std::string address = coordinator_->address();
  coordinator_->shutdown();
  coordinator_.reset();
  {
    // The stored job is still RUNNING: the coordinator stopped, not the job.
    JobStore store((dir_.path / "db").string());
    EXPECT_EQ(store.get_job(id)->state(), v1::RUNNING);
  }
  start(address);  // same address: the fakes' heartbeats find it and re-register
  v1::JobStatus st = job(id);
  EXPECT_EQ(st.epoch(), 1);
  EXPECT_NE(st.state(), v1::RUNNING);
  ASSERT_TRUE(wait_state(id, v1::SUCCEEDED));
  std::vector<v1::ConfigureRequest> cfgs = w.configures();
  ASSERT_EQ(cfgs.size(), 2u);
  EXPECT_EQ(cfgs[1].epoch(), 1);
  EXPECT_GE(cfgs[1].resume().step(), 10);
  EXPECT_TRUE(contains(log_lines(id), "coordinator restarted: job requeued as epoch 1"));
}

}  // namespace
}  // namespace loopmoe::coordinator
