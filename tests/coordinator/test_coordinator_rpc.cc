// The coordinator service over real gRPC on 127.0.0.1: health, the rendezvous KV, validation of
// submitted jobs and their data, and the metrics endpoint.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "coordinator/coordinator.h"
#include "coordinator/health.h"
#include "coordinator/job_spec.h"
#include "coordinator_fixture.h"
#include "dataloader/token_shard.h"
#include "security/health_server.h"
#include "tests/http_get.h"

namespace loopmoe::coordinator {
namespace {

using testing::CoordinatorTest;
using testing::eventually;
using testing::FakeProcess;
using testing::test_config;
using testing::test_options;

// ------------------------------------------------------------------------------------------------
// The service

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

// gRPC servers set SO_REUSEPORT by default: a second server of the same user could then bind a
// port in use, and the kernel would split the connections between the two (a CI run once lost a
// Configure that way). Ours never share: the second server fails to start, with a clear error.
TEST_F(CoordinatorTest, ASecondServerOnTheSamePortFailsToStart) {
  CoordinatorOptions o = test_options(dir_.path / "second");
  o.listen = coordinator_->address();
  try {
    Coordinator second(o);
    ADD_FAILURE() << "a second coordinator started on " << o.listen;
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot listen on " + o.listen), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(security::HealthServer health(coordinator_->address()), std::runtime_error);
  EXPECT_THROW(FakeProcess fake("", {}, coordinator_->address()), std::runtime_error);
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
  v1::JobSpec many = spec(test_config(20, 5, 10, 10));
  many.mutable_schedule()->set_kind(v1::LoopSchedule::LIST);
  many.mutable_schedule()->add_loops(1025);
  cases.push_back({many, "loops entry 1025 is above 1024"});
  uniform.mutable_schedule()->set_max_loops(2147483647);
  cases.push_back({uniform, "max_loops = 2147483647 is above 1024"});
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
  dataloader::write_token_shard(path, vocab, ids, std::vector<uint64_t>{0, tokens});
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
