// The JobDriver on its own: a real JobStore in a temporary directory, a ProcessRegistry holding
// standalone fake training processes (fake_process.h, over real gRPC on 127.0.0.1), and no
// Coordinator server. The test plays the scheduler (assigns the processes, builds the members)
// and CancelJob.
#include <absl/synchronization/mutex.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "coordinator/job_driver.h"
#include "coordinator/job_spec.h"
#include "coordinator/job_store.h"
#include "coordinator/metrics.h"
#include "coordinator/process_registry.h"
#include "fake_process.h"

namespace loopmoe::coordinator {
namespace {

using testing::eventually;
using testing::FakeProcess;
using testing::FakeScript;
using testing::TempDir;
using testing::test_config;
using testing::test_options;

class JobDriverTest : public ::testing::Test {
 protected:
  JobDriverTest()
      : options_(test_options(dir_.path)),
        store_((dir_.path / "db").string()),
        registry_(std::chrono::seconds(60)),  // liveness is not under test: no heartbeats here
        metrics_("") {}
  // A failed test shows what the driver logged (why a run failed or was requeued).
  void TearDown() override {
    if (!HasFailure()) return;
    for (const std::string& id : jobs_) {
      for (const std::string& line : log_lines(id))
        std::printf("job %s log: %s\n", id.c_str(), line.c_str());
    }
  }

  struct Process {
    std::unique_ptr<FakeProcess> fake;
    std::string id;  // in registry_
  };

  FakeProcess& add(v1::Role role, FakeScript script = {}) {
    script.role = role;
    Process p;
    p.fake = std::make_unique<FakeProcess>("", script);
    p.id = registry_.register_process(role, p.fake->address(), "", "fake");
    processes_.push_back(std::move(p));
    return *processes_.back().fake;
  }
  const std::string& id_of(const FakeProcess& f) const {
    for (const Process& p : processes_) {
      if (p.fake.get() == &f) return p.id;
    }
    throw std::logic_error("unknown fake");
  }

  // A new job record, QUEUED, for every process added (workers, then shards).
  std::string create_job(const std::string& config) {
    v1::JobStatus job;
    job.set_job_id(store_.next_job_id());
    job.mutable_spec()->set_name("driver-test");
    job.mutable_spec()->set_config_toml(config);
    job.mutable_spec()->set_num_workers(count(v1::WORKER));
    job.mutable_spec()->set_num_shards(count(v1::EXPERT_SHARD));
    job.set_state(v1::QUEUED);
    job.set_total_steps(validate_job_spec(job.spec(), "test").train.steps);
    store_.put_job(job);
    jobs_.push_back(job.job_id());
    return job.job_id();
  }
  int count(v1::Role role) {
    return static_cast<int>(std::count_if(processes_.begin(), processes_.end(),
                                          [&](const Process& p) { return role_of(p.id) == role; }));
  }
  v1::Role role_of(const std::string& id) {
    std::optional<ProcessInfo> p = registry_.get(id);
    return p ? p->role : v1::ROLE_UNSPECIFIED;
  }

  // What the scheduler does: assign every process to the job, mark it STARTING, build a driver.
  std::unique_ptr<JobDriver> start_driver(const std::string& job_id) {
    std::vector<std::string> ids;
    std::vector<Member> members;
    for (v1::Role role : {v1::WORKER, v1::EXPERT_SHARD}) {
      int rank = 0;
      for (const Process& p : processes_) {
        if (role_of(p.id) != role) continue;
        ids.push_back(p.id);
        members.push_back(
            make_member(p.id, role, rank++, p.fake->address(), security::Credentials::Insecure()));
      }
    }
    EXPECT_TRUE(registry_.assign(ids, job_id));
    std::optional<v1::JobStatus> job = store_.get_job(job_id);
    EXPECT_TRUE(job);
    job->set_state(v1::STARTING);
    job->clear_process_ids();
    for (const std::string& id : ids) job->add_process_ids(id);
    store_.put_job(*job);
    DriverHost host;
    host.mu = &mu_;
    host.changed = &changed_;
    host.requeue = [this](const std::string& id) { requeued_.push_back(id); };
    return std::make_unique<JobDriver>(options_, dir_.path.string(), store_, registry_, metrics_,
                                       std::move(host), job_id, std::move(members));
  }

  v1::JobStatus job(const std::string& id) {
    std::optional<v1::JobStatus> j = store_.get_job(id);
    EXPECT_TRUE(j);
    return j ? *j : v1::JobStatus();
  }
  std::vector<std::string> log_lines(const std::string& id) {
    std::vector<std::string> out;
    for (const v1::LogLine& l : store_.read_log(id, 0, 1000)) out.push_back(l.text());
    return out;
  }
  static bool contains(const std::vector<std::string>& lines, const std::string& text) {
    return std::any_of(lines.begin(), lines.end(),
                       [&](const std::string& l) { return l.find(text) != std::string::npos; });
  }
  static std::vector<int64_t> first_steps(FakeProcess& f) {
    std::vector<int64_t> out;
    for (const v1::RunStepsRequest& r : f.run_steps()) out.push_back(r.first_step());
    return out;
  }
  std::vector<int64_t> checkpoint_steps(const std::string& id) {
    std::vector<int64_t> out;
    for (const v1::CheckpointMeta& m : store_.list_checkpoints(id)) out.push_back(m.step());
    return out;
  }

  TempDir dir_;
  CoordinatorOptions options_;
  JobStore store_;
  ProcessRegistry registry_;
  CoordinatorMetrics metrics_;
  // Stands in for the coordinator's: guards requeued_ (requeue is called under it; the tests read
  // it after the driver's thread has ended).
  absl::Mutex mu_;
  absl::CondVar changed_;
  std::vector<std::string> requeued_;
  std::vector<Process> processes_;
  std::vector<std::string> jobs_;  // created by create_job
};

TEST_F(JobDriverTest, RunsAJobToCompletionAndCommitsItsCheckpoints) {
  FakeProcess& w0 = add(v1::WORKER);
  FakeProcess& w1 = add(v1::WORKER);
  FakeProcess& s0 = add(v1::EXPERT_SHARD);
  const std::string id = create_job(test_config(8, 2, 4, 4));
  std::unique_ptr<JobDriver> driver = start_driver(id);
  EXPECT_FALSE(driver->finished());
  driver->run();
  EXPECT_TRUE(driver->finished());

  v1::JobStatus st = job(id);
  EXPECT_EQ(st.state(), v1::SUCCEEDED);
  EXPECT_EQ(st.epoch(), 0);
  EXPECT_EQ(st.step(), 8);
  EXPECT_EQ(st.last_checkpoint_step(), 8);
  EXPECT_DOUBLE_EQ(st.loss(), 10.0 / 8);      // worker 0's loss at the last step
  EXPECT_DOUBLE_EQ(st.val_loss(), 20.0 / 8);  // worker 0's val_loss after step 8
  EXPECT_TRUE(requeued_.empty());

  // Step chunks end at the log/eval/checkpoint intervals; the fixed schedule runs n_loops = 2.
  for (FakeProcess* p : {&w0, &w1, &s0}) {
    EXPECT_EQ(first_steps(*p), (std::vector<int64_t>{0, 2, 4, 6}));
    for (const v1::RunStepsRequest& r : p->run_steps()) {
      EXPECT_EQ(r.job_id(), id);
      EXPECT_EQ(std::vector<int32_t>(r.loops().begin(), r.loops().end()),
                (std::vector<int32_t>{2, 2}));
    }
    EXPECT_EQ(p->call_log(),
              (std::vector<std::string>{"Configure", "RunSteps", "RunSteps", "Evaluate@4",
                                        "Checkpoint@4", "RunSteps", "RunSteps", "Evaluate@8",
                                        "Checkpoint@8", "Shutdown"}));
    ASSERT_EQ(p->configures().size(), 1u);
    const v1::ConfigureRequest c = p->configures()[0];
    EXPECT_EQ(c.epoch(), 0);
    EXPECT_EQ(c.rendezvous_prefix(), "job/" + id + "/epoch/0/");
    EXPECT_EQ(c.num_workers(), 2);
    EXPECT_EQ(c.num_shards(), 1);
    EXPECT_EQ(c.output_dir(), (dir_.path / "jobs" / id).string());
    EXPECT_FALSE(c.has_resume());
  }
  EXPECT_EQ(w1.configures()[0].rank(), 1);
  EXPECT_EQ(s0.configures()[0].role(), v1::EXPERT_SHARD);

  // Both checkpoints committed, each with every process's file and worker 0's sampler state.
  std::vector<v1::CheckpointMeta> metas = store_.list_checkpoints(id);
  ASSERT_EQ(metas.size(), 2u);
  EXPECT_EQ(metas[0].step(), 4);
  EXPECT_EQ(metas[1].step(), 8);
  for (const v1::CheckpointMeta& m : metas) {
    EXPECT_EQ(m.job_id(), id);
    EXPECT_EQ(m.epoch(), 0);
    EXPECT_EQ(m.num_workers(), 2);
    EXPECT_EQ(m.num_shards(), 1);
    EXPECT_NE(m.config_hash(), 0u);
    EXPECT_EQ(m.sampler().index(), static_cast<uint64_t>(m.step()) * 16);
    ASSERT_EQ(m.files_size(), 3);
    EXPECT_EQ(m.files(1).role(), v1::WORKER);
    EXPECT_EQ(m.files(1).rank(), 1);
    EXPECT_EQ(m.files(2).role(), v1::EXPERT_SHARD);
    EXPECT_EQ(m.files(2).rank(), 0);
    char dir[32];
    std::snprintf(dir, sizeof dir, "step-%08lld", static_cast<long long>(m.step()));
    EXPECT_EQ(m.files(0).path(),
              (dir_.path / "jobs" / id / "checkpoints" / dir / "worker-0.bin").string());
  }
  EXPECT_EQ(metas[0].config_hash(), metas[1].config_hash());

  // metrics.jsonl: a record per logged step and per validation.
  std::ifstream metrics(dir_.path / "jobs" / id / "metrics.jsonl");
  std::vector<std::string> records;
  for (std::string line; std::getline(metrics, line);) records.push_back(line);
  ASSERT_EQ(records.size(), 6u);
  EXPECT_EQ(records[0].rfind("{\"step\": 2, \"loss\": 5,", 0), 0u) << records[0];
  EXPECT_EQ(records[2], "{\"step\": 4, \"val_loss\": 5}");

  std::vector<std::string> lines = log_lines(id);
  EXPECT_TRUE(contains(lines, "epoch 0: starting on "));
  EXPECT_TRUE(contains(lines, "from step 0"));
  EXPECT_TRUE(contains(lines, "checkpoint step 4 committed (3 files)"));
  EXPECT_EQ(lines.back(), "succeeded after 8 steps");
  // The processes are released for the next job.
  EXPECT_EQ(registry_.idle(v1::WORKER).size(), 2u);
  EXPECT_EQ(registry_.idle(v1::EXPERT_SHARD).size(), 1u);
}

TEST_F(JobDriverTest, FailureRequeuesWithNextEpochAndResumesFromLastCommittedCheckpoint) {
  FakeScript flaky;
  flaky.fail_run_at_step = 5;  // in the chunk 4..6, after the checkpoint at 4
  flaky.fail_run_times = 1;
  FakeProcess& w = add(v1::WORKER, flaky);
  FakeProcess& s = add(v1::EXPERT_SHARD);
  const std::string id = create_job(test_config(8, 2, 4, 4));

  std::unique_ptr<JobDriver> first = start_driver(id);
  first->run();
  EXPECT_TRUE(first->finished());
  v1::JobStatus st = job(id);
  EXPECT_EQ(st.state(), v1::QUEUED);
  EXPECT_EQ(st.epoch(), 1);
  EXPECT_EQ(st.process_ids_size(), 0);
  EXPECT_EQ(st.step(), 4);
  EXPECT_EQ(st.last_checkpoint_step(), 4);
  EXPECT_EQ(requeued_, (std::vector<std::string>{id}));
  EXPECT_EQ(checkpoint_steps(id), (std::vector<int64_t>{4}));
  // The survivor was told to leave the failed run; both are idle and live again.
  ASSERT_EQ(s.shutdowns().size(), 1u);
  EXPECT_EQ(s.shutdowns()[0].job_id(), id);
  EXPECT_EQ(registry_.idle(v1::WORKER), (std::vector<std::string>{id_of(w)}));
  EXPECT_EQ(registry_.idle(v1::EXPERT_SHARD), (std::vector<std::string>{id_of(s)}));
  std::vector<std::string> lines = log_lines(id);
  EXPECT_TRUE(contains(lines, "error: RunSteps on " + id_of(w) + " (worker 0 at "));
  EXPECT_TRUE(contains(lines, "scripted failure at step 5"));
  EXPECT_EQ(lines.back(), "restarting as epoch 1 from its latest checkpoint");

  // The scheduler starts it again: epoch 1 resumes from the committed step 4.
  std::unique_ptr<JobDriver> second = start_driver(id);
  second->run();
  st = job(id);
  EXPECT_EQ(st.state(), v1::SUCCEEDED);
  EXPECT_EQ(st.epoch(), 1);
  EXPECT_EQ(st.step(), 8);
  for (FakeProcess* p : {&w, &s}) {
    std::vector<v1::ConfigureRequest> cfgs = p->configures();
    ASSERT_EQ(cfgs.size(), 2u);
    EXPECT_EQ(cfgs[1].epoch(), 1);
    EXPECT_EQ(cfgs[1].rendezvous_prefix(), "job/" + id + "/epoch/1/");
    EXPECT_EQ(cfgs[1].resume().step(), 4);
    EXPECT_EQ(cfgs[1].resume().epoch(), 0);
    EXPECT_EQ(cfgs[1].resume().files_size(), 2);
    EXPECT_EQ(cfgs[1].resume().sampler().index(), 64u);
    // Epoch 1 runs 4..6 and 6..8.
    std::vector<int64_t> steps = first_steps(*p);
    ASSERT_GE(steps.size(), 4u);
    EXPECT_EQ(std::vector<int64_t>(steps.end() - 2, steps.end()), (std::vector<int64_t>{4, 6}));
  }
  // Epoch 0: 0, 2, 4 (failed); the shard's call of the failed chunk may have been cancelled
  // before it arrived.
  EXPECT_EQ(first_steps(w), (std::vector<int64_t>{0, 2, 4, 4, 6}));
  std::vector<v1::CheckpointMeta> metas = store_.list_checkpoints(id);
  ASSERT_EQ(metas.size(), 2u);
  EXPECT_EQ(metas[1].step(), 8);
  EXPECT_EQ(metas[1].epoch(), 1);
  EXPECT_TRUE(contains(log_lines(id), "resuming from step 4"));
  EXPECT_EQ(requeued_.size(), 1u);
}

TEST_F(JobDriverTest, UnreachableProcessIsRemovedFromTheRegistry) {
  FakeProcess& w = add(v1::WORKER);
  FakeScript dies;
  dies.die_at_step = 3;
  FakeProcess& doomed = add(v1::EXPERT_SHARD, dies);
  const std::string id = create_job(test_config(8, 2, 4, 4));
  start_driver(id)->run();
  EXPECT_TRUE(doomed.dead());
  EXPECT_FALSE(registry_.is_live(id_of(doomed)));
  EXPECT_TRUE(registry_.idle(v1::EXPERT_SHARD).empty());
  EXPECT_EQ(registry_.idle(v1::WORKER), (std::vector<std::string>{id_of(w)}));
  EXPECT_EQ(w.shutdowns().size(), 1u);  // the dead one is not called again
  EXPECT_TRUE(doomed.shutdowns().empty());
  v1::JobStatus st = job(id);
  EXPECT_EQ(st.state(), v1::QUEUED);
  EXPECT_EQ(st.epoch(), 1);
  EXPECT_EQ(st.last_checkpoint_step(), 0);  // died before the first checkpoint
  EXPECT_EQ(requeued_, (std::vector<std::string>{id}));
}

TEST_F(JobDriverTest, OutOfRestartsFailsTheJob) {
  options_.max_restarts = 0;
  FakeScript broken;
  broken.fail_run_at_step = 1;
  add(v1::WORKER, broken);
  add(v1::EXPERT_SHARD);
  const std::string id = create_job(test_config(8, 2, 4, 4));
  start_driver(id)->run();
  v1::JobStatus st = job(id);
  EXPECT_EQ(st.state(), v1::FAILED);
  EXPECT_EQ(st.epoch(), 0);
  EXPECT_NE(st.error().find("scripted failure at step 1"), std::string::npos) << st.error();
  EXPECT_NE(st.error().find("after 0 restart(s)"), std::string::npos) << st.error();
  EXPECT_TRUE(requeued_.empty());
  EXPECT_EQ(log_lines(id).back(), "failed: out of restarts (--max-restarts 0)");
}

// ABORTED is how a process says the job's own policy stopped it (train.nonfinite = "stop",
// runtime::PolicyStop): the job fails with restarts left, where INTERNAL (the test above, and
// FailureRequeues...) restarts it.
TEST_F(JobDriverTest, PolicyStopFailsTheJobWithoutRestart) {
  options_.max_restarts = 3;
  FakeScript stopped;
  stopped.fail_run_at_step = 1;
  stopped.fail_run_code = grpc::StatusCode::ABORTED;
  add(v1::WORKER);
  add(v1::EXPERT_SHARD, stopped);
  const std::string id = create_job(test_config(8, 2, 4, 4));
  start_driver(id)->run();
  v1::JobStatus st = job(id);
  EXPECT_EQ(st.state(), v1::FAILED);
  EXPECT_EQ(st.epoch(), 0);
  EXPECT_NE(st.error().find("ABORTED: scripted failure at step 1"), std::string::npos)
      << st.error();
  EXPECT_TRUE(requeued_.empty());
  EXPECT_EQ(log_lines(id).back(), "failed");
}

// train.nonfinite = "rollback": a process answers ABORTED with the failed step in the details
// (runtime::PolicyRollback). The job restarts from its last checkpoint instead of failing, the
// step is recorded in the job, and the replay drops it on every member (drop_steps).
TEST_F(JobDriverTest, RollbackRestartsFromTheLastCheckpointAndTheReplayDropsTheStep) {
  options_.max_restarts = 3;
  FakeScript nonfinite;
  nonfinite.rollback_at_step = 5;  // in the chunk 4..6, after the checkpoint at 4
  FakeProcess& w = add(v1::WORKER, nonfinite);
  FakeProcess& s = add(v1::EXPERT_SHARD);
  const std::string id = create_job(test_config(8, 2, 4, 4));
  start_driver(id)->run();
  v1::JobStatus st = job(id);
  EXPECT_EQ(st.state(), v1::QUEUED);
  EXPECT_EQ(st.epoch(), 1);
  EXPECT_EQ(std::vector<int64_t>(st.rollback_steps().begin(), st.rollback_steps().end()),
            std::vector<int64_t>{5});
  EXPECT_TRUE(contains(log_lines(id),
                       "warning: step 6/8: non-finite loss or gradient norm; rolling back to the "
                       "last checkpoint (rollback 1; the replay drops the step)"));
  EXPECT_EQ(log_lines(id).back(), "restarting as epoch 1 from its latest checkpoint");

  start_driver(id)->run();
  st = job(id);
  EXPECT_EQ(st.state(), v1::SUCCEEDED);
  EXPECT_EQ(st.epoch(), 1);
  EXPECT_EQ(st.step(), 8);
  for (FakeProcess* p : {&w, &s}) {
    // Epoch 0: 0..2, 2..4, 4..6 (failed); epoch 1, from the checkpoint at 4: 4..6 dropping 5,
    // then 6..8. The shard may never see epoch 0's 4..6: the driver cancels the other members'
    // calls once the worker has failed, and whether the shard's had been sent by then is a race.
    const std::vector<v1::RunStepsRequest> runs = p->run_steps();
    ASSERT_EQ(runs.size(), p == &w ? 5u : runs.size());
    ASSERT_GE(runs.size(), 4u);
    ASSERT_LE(runs.size(), 5u);
    const size_t n = runs.size();
    for (size_t i = 0; i + 2 < n; ++i) EXPECT_EQ(runs[i].drop_steps_size(), 0) << i;
    EXPECT_EQ(runs[n - 2].first_step(), 4);
    EXPECT_EQ(
        std::vector<int64_t>(runs[n - 2].drop_steps().begin(), runs[n - 2].drop_steps().end()),
        std::vector<int64_t>{5});
    EXPECT_EQ(runs[n - 1].first_step(), 6);
    EXPECT_EQ(runs[n - 1].drop_steps_size(), 0);
  }
  const std::vector<std::string> lines = log_lines(id);
  EXPECT_TRUE(contains(lines, "step 6/8 dropped on the replay after a rollback"));
  EXPECT_EQ(lines.back(), "succeeded after 8 steps");
  // metrics.jsonl has `loopmoe train`'s record of a skipped step, not a NaN loss.
  std::ifstream metrics(dir_.path / "jobs" / id / "metrics.jsonl");
  std::string all, line;
  while (std::getline(metrics, line)) all += line + "\n";
  char record[128];
  std::snprintf(record, sizeof record,
                "{\"step\": 6, \"skipped_step\": true, \"lr\": %.17g, \"skipped\": 1}", 3e-3);
  EXPECT_NE(all.find(record), std::string::npos) << all;
  EXPECT_EQ(all.find("nan"), std::string::npos) << all;

  // As `loopmoe train`, more than 10 rollbacks fail the job.
  const std::string again = create_job(test_config(8, 2, 4, 4));
  v1::JobStatus ten = job(again);
  for (int64_t step = 100; step < 110; ++step) ten.add_rollback_steps(step);
  store_.put_job(ten);
  start_driver(again)->run();
  st = job(again);
  EXPECT_EQ(st.state(), v1::FAILED);
  EXPECT_NE(st.error().find("after 10 rollbacks"), std::string::npos) << st.error();
  EXPECT_TRUE(requeued_.empty() || requeued_.back() != again);
}

// The loss-spike check of the numerics guard, as `loopmoe train` has it: a loss above factor ×
// the running median warns (a log line, the job goes on) or fails the job without a restart.
TEST_F(JobDriverTest, LossSpikeWarnsOrFailsTheJob) {
  auto spiky_config = [](const std::string& action) {
    std::string config = test_config(8, 2, 4, 4);
    const std::string guard =
        "[train]\nloss_spike_factor = 3\nloss_spike_window = 3\n"
        "loss_spike_action = \"" +
        action + "\"\n";
    config.replace(config.find("[train]\n"), 8, guard);
    return config;
  };
  FakeScript spiky;
  spiky.spike_at_step = 6;
  add(v1::WORKER, spiky);
  add(v1::EXPERT_SHARD);
  const std::string warned = create_job(spiky_config("warn"));
  start_driver(warned)->run();
  EXPECT_EQ(job(warned).state(), v1::SUCCEEDED);
  const std::vector<std::string> lines = log_lines(warned);
  EXPECT_TRUE(contains(lines, "warning: loss spike at step 6: 166.667 > 3 x the running median"));
  int spikes = 0;
  for (const std::string& line : lines) spikes += line.find("loss spike") != std::string::npos;
  EXPECT_EQ(spikes, 1);

  const std::string stopped = create_job(spiky_config("stop"));
  start_driver(stopped)->run();
  const v1::JobStatus st = job(stopped);
  EXPECT_EQ(st.state(), v1::FAILED);
  EXPECT_EQ(st.epoch(), 0);
  EXPECT_NE(st.error().find("loss spike at step 6"), std::string::npos) << st.error();
  EXPECT_NE(st.error().find("last checkpoint: step 4"), std::string::npos) << st.error();
  EXPECT_TRUE(requeued_.empty());
}

TEST_F(JobDriverTest, CancelStopsBetweenChunks) {
  FakeScript slow;
  slow.step_delay = std::chrono::milliseconds(300);
  FakeProcess& w = add(v1::WORKER, slow);
  FakeProcess& s = add(v1::EXPERT_SHARD, slow);
  const std::string id = create_job(test_config(100, 2, 0, 0));
  std::unique_ptr<JobDriver> driver = start_driver(id);
  std::thread thread([&] { driver->run(); });
  // Cancel while the first chunk is in flight, as CancelJob does.
  ASSERT_TRUE(eventually([&] { return w.run_steps().size() == 1 && s.run_steps().size() == 1; }));
  {
    absl::MutexLock lock(&mu_);
    v1::JobStatus st = job(id);
    st.set_state(v1::CANCELLED);
    store_.put_job(st);
    driver->cancel();
  }
  thread.join();
  EXPECT_TRUE(driver->finished());
  // The chunk in flight finished; no other started.
  EXPECT_EQ(w.call_log(), (std::vector<std::string>{"Configure", "RunSteps", "Shutdown"}));
  EXPECT_EQ(s.call_log(), (std::vector<std::string>{"Configure", "RunSteps", "Shutdown"}));
  v1::JobStatus st = job(id);
  EXPECT_EQ(st.state(), v1::CANCELLED);
  EXPECT_EQ(st.step(), 0);  // a cancelled record is not updated any more
  EXPECT_TRUE(requeued_.empty());
  EXPECT_EQ(log_lines(id).back(), "cancelled at step 0");
  EXPECT_EQ(registry_.idle(v1::WORKER).size(), 1u);
}

TEST_F(JobDriverTest, StopLeavesTheJobAsItIs) {
  FakeScript slow;
  slow.step_delay = std::chrono::milliseconds(2000);
  FakeProcess& w = add(v1::WORKER, slow);
  add(v1::EXPERT_SHARD, slow);
  const std::string id = create_job(test_config(100, 2, 0, 0));
  std::unique_ptr<JobDriver> driver = start_driver(id);
  std::thread thread([&] { driver->run(); });
  ASSERT_TRUE(eventually([&] { return w.run_steps().size() == 1; }));
  const auto stopped = std::chrono::steady_clock::now();
  driver->stop();  // cancels the RunSteps calls in flight
  thread.join();
  EXPECT_LT(std::chrono::steady_clock::now() - stopped, std::chrono::milliseconds(1500));
  EXPECT_TRUE(driver->finished());
  v1::JobStatus st = job(id);
  EXPECT_EQ(st.state(), v1::RUNNING);  // requeued by the next coordinator start
  EXPECT_EQ(st.epoch(), 0);
  EXPECT_TRUE(requeued_.empty());
  EXPECT_EQ(w.call_log().back(), "Shutdown");
}

}  // namespace
}  // namespace loopmoe::coordinator
