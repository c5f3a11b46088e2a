// The coordinator against fake training processes over real gRPC on 127.0.0.1.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "coordinator/coordinator.h"
#include "coordinator/health.h"
#include "coordinator/job_spec.h"
#include "coordinator/job_store.h"
#include "dataloader/token_shard.h"
#include "fake_process.h"
#include "model/error.h"

namespace loopmoe::coordinator {
namespace {

using testing::eventually;
using testing::FakeProcess;
using testing::FakeScript;
using testing::TempDir;
using testing::test_config;
using testing::test_options;

// ------------------------------------------------------------------------------------------------
// Job store

TEST(JobStore, RoundTripAndReopen) {
  TempDir dir;
  v1::JobStatus job;
  {
    JobStore store((dir.path / "db").string());
    EXPECT_EQ(store.next_job_id(), "1");
    EXPECT_EQ(store.next_job_id(), "2");
    job.set_job_id("2");
    job.set_state(v1::RUNNING);
    job.mutable_spec()->set_name("tiny");
    job.set_step(40);
    store.put_job(job);
    v1::JobStatus ten = job;
    ten.set_job_id("10");  // numeric order, not text order
    store.put_job(ten);
    EXPECT_EQ(store.append_log("2", "first", 1), 0);
    EXPECT_EQ(store.append_log("2", "second", 2), 1);
    EXPECT_EQ(store.append_log("10", "other job", 3), 0);
    v1::CheckpointMeta meta;
    meta.set_job_id("2");
    meta.set_step(20);
    meta.add_files()->set_path("/x/worker-0.bin");
    store.put_checkpoint(meta);
    meta.set_step(100);
    store.put_checkpoint(meta);
  }
  JobStore store((dir.path / "db").string());
  EXPECT_EQ(store.next_job_id(), "3");
  std::optional<v1::JobStatus> back = store.get_job("2");
  ASSERT_TRUE(back);
  EXPECT_EQ(back->spec().name(), "tiny");
  EXPECT_EQ(back->step(), 40);
  EXPECT_FALSE(store.get_job("7"));
  EXPECT_FALSE(store.get_job("not-a-number"));
  std::vector<v1::JobStatus> jobs = store.list_jobs();
  ASSERT_EQ(jobs.size(), 2u);
  EXPECT_EQ(jobs[0].job_id(), "2");
  EXPECT_EQ(jobs[1].job_id(), "10");
  EXPECT_EQ(store.log_size("2"), 2);
  EXPECT_EQ(store.append_log("2", "third", 4), 2);  // the counter survives the reopen
  std::vector<v1::LogLine> lines = store.read_log("2", 1, 100);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0].text(), "second");
  EXPECT_EQ(lines[1].text(), "third");
  EXPECT_EQ(lines[1].line(), 2);
  std::vector<v1::CheckpointMeta> ckpts = store.list_checkpoints("2");
  ASSERT_EQ(ckpts.size(), 2u);
  EXPECT_EQ(ckpts[0].step(), 20);
  EXPECT_EQ(ckpts[1].step(), 100);
  EXPECT_EQ(ckpts[1].files(0).path(), "/x/worker-0.bin");
  EXPECT_TRUE(store.list_checkpoints("10").empty());
}

TEST(JobStore, CorruptDatabaseNamesThePath) {
  TempDir dir;
  const std::string db = (dir.path / "db").string();
  { JobStore store(db); }
  std::ofstream(db + "/CURRENT", std::ios::trunc) << "garbage\n";
  try {
    JobStore store(db);
    FAIL() << "opened a corrupt database";
  } catch (const StoreError& e) {
    EXPECT_NE(std::string(e.what()).find(db + ": cannot open the coordinator database"),
              std::string::npos)
        << e.what();
  }
}

TEST(JobStore, SecondCoordinatorOnSameDirFailsClearly) {
  TempDir dir;
  Coordinator first(test_options(dir.path));
  try {
    Coordinator second(test_options(dir.path));
    FAIL() << "two coordinators opened one database";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("cannot open the coordinator database"), std::string::npos)
        << e.what();
  }
}

// ------------------------------------------------------------------------------------------------
// Schedules and chunks (pure functions)

TEST(Schedule, LoopsAndChunks) {
  v1::LoopSchedule s;
  EXPECT_EQ(loops_for_step(s, 4, 17), 4);
  s.set_kind(v1::LoopSchedule::LIST);
  for (int r : {1, 2, 3}) s.add_loops(r);
  EXPECT_EQ(loops_for_step(s, 4, 0), 1);
  EXPECT_EQ(loops_for_step(s, 4, 4), 2);
  EXPECT_EQ(loops_for_step(s, 4, 8), 3);
  v1::LoopSchedule u;
  u.set_kind(v1::LoopSchedule::UNIFORM);
  u.set_min_loops(2);
  u.set_max_loops(5);
  u.set_seed(7);
  std::set<int> seen;
  for (int64_t i = 0; i < 200; ++i) {
    const int r = loops_for_step(u, 1, i);
    EXPECT_GE(r, 2);
    EXPECT_LE(r, 5);
    EXPECT_EQ(r, loops_for_step(u, 1, i));
    seen.insert(r);
  }
  EXPECT_EQ(seen.size(), 4u);
  u.set_seed(8);
  int same = 0;
  for (int64_t i = 0; i < 200; ++i)
    same += loops_for_step(u, 1, i) == [&] {
      v1::LoopSchedule v = u;
      v.set_seed(7);
      return loops_for_step(v, 1, i);
    }();
  EXPECT_LT(same, 150);  // the seed matters

  TrainConfig t;
  t.steps = 120;
  t.log_interval = 7;
  t.eval_interval = 0;
  t.checkpoint_interval = 25;
  EXPECT_EQ(next_chunk_end(t, 0), 7);
  EXPECT_EQ(next_chunk_end(t, 21), 25);
  EXPECT_EQ(next_chunk_end(t, 119), 120);
  t.log_interval = 1000;
  t.checkpoint_interval = 0;
  EXPECT_EQ(next_chunk_end(t, 0), 50);
  EXPECT_EQ(next_chunk_end(t, 100), 120);
  EXPECT_TRUE(eval_due(t, 120));
  EXPECT_FALSE(eval_due(t, 100));
  EXPECT_TRUE(checkpoint_due(t, 120));
}

TEST(Schedule, ParseJobFile) {
  const std::string text = test_config(20, 5, 10, 10) +
                           "\n[job]\nname = \"tiny\"\nworkers = 2\nshards = 3\nthreads = 2\n"
                           "output_dir = \"out\"\n[job.schedule]\nkind = \"list\"\n"
                           "loops = [1, 3]\n";
  v1::JobSpec spec = parse_job_file(text, "job.toml", "/home/me");
  EXPECT_EQ(spec.name(), "tiny");
  EXPECT_EQ(spec.num_workers(), 2);
  EXPECT_EQ(spec.num_shards(), 3);
  EXPECT_EQ(spec.threads(), 2);
  EXPECT_EQ(spec.output_dir(), "/home/me/out");
  EXPECT_EQ(spec.schedule().kind(), v1::LoopSchedule::LIST);
  ASSERT_EQ(spec.schedule().loops_size(), 2);
  EXPECT_EQ(spec.schedule().loops(1), 3);
  EXPECT_EQ(spec.config_toml().find("[job"), std::string::npos);
  Config c = parse_config(spec.config_toml(), "x");
  EXPECT_EQ(c.data.dir, "/nonexistent/data");
  EXPECT_EQ(c.train.steps, 20);
  // Relative data.dir becomes absolute.
  v1::JobSpec rel = parse_job_file("[data]\ndir = \"data/sotu\"\n", "j.toml", "/home/me");
  EXPECT_EQ(parse_config(rel.config_toml(), "x").data.dir, "/home/me/data/sotu");
  try {
    parse_job_file(text + "workerz = 1\n", "job.toml", "/");
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_STREQ(e.what(), "job.toml: unknown key job.schedule.workerz");
  }
  try {
    parse_job_file("[job]\nworkers = 1\n[job.schedule]\nkind = \"random\"\n", "job.toml", "/");
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("job.schedule.kind = 'random'"), std::string::npos);
  }
}

// ------------------------------------------------------------------------------------------------
// The service

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

TEST_F(CoordinatorTest, HealthServing) {
  HealthResult h =
      check_health(grpc::CreateChannel(coordinator_->address(), grpc::InsecureChannelCredentials()),
                   std::chrono::seconds(5));
  EXPECT_TRUE(h.ok) << h.error;
  EXPECT_EQ(h.status, "SERVING");
  HealthResult none =
      check_health(grpc::CreateChannel("127.0.0.1:1", grpc::InsecureChannelCredentials()),
                   std::chrono::milliseconds(300));
  EXPECT_FALSE(none.ok);
  EXPECT_FALSE(none.error.empty());
}

TEST_F(CoordinatorTest, KvSetGetWait) {
  auto set = [&](const std::string& key, const std::string& value) {
    grpc::ClientContext c;
    v1::KvSetRequest r;
    r.set_key(key);
    r.set_value(value);
    v1::KvSetResponse response;
    ASSERT_TRUE(stub_->KvSet(&c, r, &response).ok());
  };
  auto wait = [&](std::vector<std::string> keys, int64_t timeout_ms) {
    grpc::ClientContext c;
    v1::KvWaitRequest r;
    for (auto& k : keys) r.add_keys(k);
    r.set_timeout_ms(timeout_ms);
    v1::KvWaitResponse response;
    EXPECT_TRUE(stub_->KvWait(&c, r, &response).ok());
    return std::vector<std::string>(response.missing().begin(), response.missing().end());
  };
  set("job/1/epoch/0/gloo/world/0", std::string("a\0b", 3));
  {
    grpc::ClientContext c;
    v1::KvGetRequest r;
    r.set_key("job/1/epoch/0/gloo/world/0");
    v1::KvGetResponse response;
    ASSERT_TRUE(stub_->KvGet(&c, r, &response).ok());
    EXPECT_TRUE(response.found());
    EXPECT_EQ(response.value(), std::string("a\0b", 3));
  }
  {
    grpc::ClientContext c;
    v1::KvGetRequest r;
    r.set_key("job/1/epoch/1/gloo/world/0");  // another epoch: another key
    v1::KvGetResponse response;
    ASSERT_TRUE(stub_->KvGet(&c, r, &response).ok());
    EXPECT_FALSE(response.found());
  }
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::string> missing =
      wait({"job/1/epoch/0/gloo/world/0", "job/1/epoch/0/gloo/world/1", "k2"}, 200);
  EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(190));
  EXPECT_EQ(missing, (std::vector<std::string>{"job/1/epoch/0/gloo/world/1", "k2"}));
  EXPECT_TRUE(wait({"job/1/epoch/0/gloo/world/0"}, 0).empty());

  // A wait released by a later set, long before its timeout.
  std::thread setter([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    set("late", "1");
  });
  const auto t1 = std::chrono::steady_clock::now();
  EXPECT_TRUE(wait({"late"}, 20000).empty());
  EXPECT_LT(std::chrono::steady_clock::now() - t1, std::chrono::seconds(5));
  setter.join();
}

TEST_F(CoordinatorTest, RejectsBadSpecsWithClearMessages) {
  struct Case {
    v1::JobSpec spec;
    std::string want;
  };
  std::vector<Case> cases;
  cases.push_back({spec("[model]\nd_modle = 3\n"), "unknown key model.d_modle"});
  cases.push_back({spec("[model\n"), "job spec:1:"});
  cases.push_back({spec(test_config(20, 5, 10, 10), 0, 1), "workers = 0 must be at least 1"});
  cases.push_back({spec(test_config(20, 5, 10, 10), 1, 0), "shards = 0 must be in [1, 4]"});
  cases.push_back({spec(test_config(20, 5, 10, 10), 1, 5), "shards = 5 must be in [1, 4]"});
  v1::JobSpec list = spec(test_config(20, 5, 10, 10));
  list.mutable_schedule()->set_kind(v1::LoopSchedule::LIST);
  cases.push_back({list, "non-empty loops"});
  list.mutable_schedule()->add_loops(2);
  list.mutable_schedule()->add_loops(0);
  cases.push_back({list, "loops entry 0 must be at least 1"});
  v1::JobSpec uniform = spec(test_config(20, 5, 10, 10));
  uniform.mutable_schedule()->set_kind(v1::LoopSchedule::UNIFORM);
  cases.push_back({uniform, "min_loops = 0 must be at least 1"});
  uniform.mutable_schedule()->set_min_loops(3);
  uniform.mutable_schedule()->set_max_loops(2);
  cases.push_back({uniform, "max_loops = 2 is below min_loops = 3"});
  for (const Case& c : cases) {
    grpc::Status s = submit(c.spec, nullptr);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.want;
    EXPECT_NE(s.error_message().find(c.want), std::string::npos)
        << "want '" << c.want << "' in '" << s.error_message() << "'";
  }
  grpc::ClientContext c;
  v1::ListJobsResponse jobs;
  ASSERT_TRUE(stub_->ListJobs(&c, v1::ListJobsRequest(), &jobs).ok());
  EXPECT_EQ(jobs.jobs_size(), 0);  // nothing was queued
}

// test_config's job with data.dir = `dir`.
std::string config_with_data(const std::filesystem::path& dir) {
  std::string c = test_config(20, 5, 10, 10);
  const std::string from = "/nonexistent/data";
  return c.replace(c.find(from), from.size(), dir.string());
}

void write_shard(const std::filesystem::path& path, uint32_t vocab, size_t tokens) {
  std::filesystem::create_directories(path.parent_path());
  const std::vector<int32_t> ids(tokens, 1);
  data::write_token_shard(path, vocab, ids, std::vector<uint64_t>{0, tokens});
}

// A job whose data would fail it (at the first validation, after the training work) is refused
// at submission, naming the file; the check reads shard headers only.
TEST_F(CoordinatorTest, RefusesAJobWhoseDataWouldFailIt) {
  coordinator_.reset();
  check_data_ = true;
  start();
  const std::filesystem::path data = dir_.path / "data";
  struct Case {
    std::function<void()> setup;
    std::string want;
  };
  const std::vector<Case> cases = {
      {[] {}, data.string() + "/train.bin: cannot open"},
      {[&] { write_shard(data / "train.bin", 256, 1000); },
       data.string() + "/val.bin: cannot open"},
      {[&] { write_shard(data / "val.bin", 256, 0); },
       data.string() +
           "/val.bin: too few tokens for seq_len 16: shard holds 0, one window needs 17; every "
           "job validates after its last step (train.steps = 20)"},
      {[&] { write_shard(data / "val.bin", 300, 100); },
       data.string() + "/val.bin: shard vocabulary 300 exceeds model.vocab_size 256"},
      {[&] { write_shard(data / "train.bin", 256, 16); },
       data.string() + "/train.bin: too few tokens for seq_len 16"},
  };
  for (const Case& c : cases) {
    c.setup();
    grpc::Status s = submit(spec(config_with_data(data)), nullptr);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.want;
    EXPECT_EQ(s.error_message().rfind("job spec: data.dir: " + c.want, 0), 0u)
        << "want '" << c.want << "' at the start of '" << s.error_message() << "'";
  }
  {
    grpc::ClientContext c;
    v1::ListJobsResponse jobs;
    ASSERT_TRUE(stub_->ListJobs(&c, v1::ListJobsRequest(), &jobs).ok());
    EXPECT_EQ(jobs.jobs_size(), 0);  // nothing was queued
  }
  write_shard(data / "train.bin", 256, 17);  // one window each is enough
  write_shard(data / "val.bin", 200, 17);
  EXPECT_FALSE(submit_ok(spec(config_with_data(data))).empty());
}

// A job started from another job's checkpoint, on other worker/shard counts: Configure carries
// that checkpoint; bad references are refused at submission.
TEST_F(CoordinatorTest, ResumeFromAnotherJobsCheckpoint) {
  add(v1::WORKER);
  add(v1::EXPERT_SHARD);
  const std::string first = submit_ok(spec(test_config(20, 5, 10, 10), 1, 1));
  ASSERT_TRUE(wait_state(first, v1::SUCCEEDED));
  FakeProcess& s1 = add(v1::EXPERT_SHARD);
  v1::JobSpec next = spec(test_config(20, 5, 10, 10), 1, 2);
  next.set_resume_from_job(first);
  next.set_resume_step(10);
  const std::string second = submit_ok(next);
  ASSERT_TRUE(wait_state(second, v1::SUCCEEDED));
  ASSERT_EQ(s1.configures().size(), 1u);
  const v1::CheckpointMeta from = s1.configures()[0].resume();
  EXPECT_EQ(from.step(), 10);
  EXPECT_EQ(from.job_id(), first);
  EXPECT_EQ(from.num_shards(), 1);
  EXPECT_EQ(s1.run_steps()[0].first_step(), 10);

  struct Case {
    std::string job, want;
    int64_t step;
    std::string config;
  };
  const std::vector<Case> cases = {
      {"77", "no job '77'", 0, test_config(20, 5, 10, 10)},
      {first, "no committed checkpoint at step 7 (committed steps: 10, 20)", 7,
       test_config(20, 5, 10, 10)},
      {first, "the config differs from job " + first, 0, test_config(30, 5, 10, 10)},
  };
  for (const Case& c : cases) {
    v1::JobSpec bad = spec(c.config, 1, 1);
    bad.set_resume_from_job(c.job);
    bad.set_resume_step(c.step);
    grpc::Status st = submit(bad, nullptr);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.want;
    EXPECT_NE(st.error_message().find(c.want), std::string::npos)
        << "want '" << c.want << "' in '" << st.error_message() << "'";
  }
}

TEST_F(CoordinatorTest, UnknownJobIsNotFound) {
  {
    grpc::ClientContext c;
    v1::GetJobRequest r;
    r.set_job_id("42");
    v1::JobStatus s;
    grpc::Status status = stub_->GetJob(&c, r, &s);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
    EXPECT_EQ(status.error_message(), "no job '42'");
  }
  {
    grpc::ClientContext c;
    v1::CancelJobRequest r;
    r.set_job_id("42");
    v1::JobStatus s;
    EXPECT_EQ(stub_->CancelJob(&c, r, &s).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  {
    grpc::ClientContext c;
    v1::WatchJobRequest r;
    r.set_job_id("42");
    auto reader = stub_->WatchJob(&c, r);
    v1::LogLine line;
    EXPECT_FALSE(reader->Read(&line));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::NOT_FOUND);
  }
}

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

// A plain HTTP GET of http://address/metrics.
std::string http_get_metrics(const std::string& address) {
  const int port = std::stoi(address.substr(address.rfind(':') + 1));
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(port));
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
    close(fd);
    return "";
  }
  const std::string request = "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n";
  (void)!write(fd, request.data(), request.size());
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

TEST_F(CoordinatorTest, MetricsExposed) {
  metrics_listen_ = "127.0.0.1:0";
  coordinator_.reset();
  start();
  ASSERT_FALSE(coordinator_->metrics_address().empty());
  add(v1::WORKER);
  add(v1::EXPERT_SHARD);
  const std::string id = submit_ok(spec(test_config(10, 5, 0, 0)));
  ASSERT_TRUE(wait_state(id, v1::SUCCEEDED));
  std::string text;
  ASSERT_TRUE(eventually([&] {
    text = http_get_metrics(coordinator_->metrics_address());
    return text.find("loopmoe_coordinator_jobs{state=\"succeeded\"} 1") != std::string::npos;
  })) << text;
  EXPECT_NE(text.find("loopmoe_coordinator_processes{role=\"worker\",state=\"live\"} 1"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("loopmoe_process_heartbeat_age_seconds{process_id=\"worker-1\""),
            std::string::npos);
  EXPECT_NE(text.find("loopmoe_job_step{job_id=\"1\"} 10"), std::string::npos);
  EXPECT_NE(text.find("loopmoe_job_loss{job_id=\"1\"} 1"), std::string::npos);
  // The standard process series of the Prometheus client libraries, without labels.
  for (const char* name : {"process_cpu_seconds_total", "process_resident_memory_bytes",
                           "process_virtual_memory_bytes", "process_open_fds", "process_max_fds",
                           "process_start_time_seconds", "process_threads"}) {
    EXPECT_NE(text.find(std::string("\n") + name + " "), std::string::npos) << name << "\n" << text;
  }
  EXPECT_NE(text.find("# TYPE process_cpu_seconds_total counter"), std::string::npos) << text;
}

}  // namespace
}  // namespace loopmoe::coordinator
