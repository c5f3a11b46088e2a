// A secured coordinator and secured training processes (ProcessHost with a fake runtime) over real
// TLS on 127.0.0.1: every RPC of both services refused without or with a wrong credential, a CLI
// token refused on process RPCs with nothing executed, a process token refused on control RPCs,
// mutual TLS required of processes, TLS required, health open, output_dir confined, and a job
// that runs to the end with everything authenticated.
#include <grpcpp/create_channel.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <functional>
#include <map>
#include <set>

#include "coordinator/coordinator.h"
#include "coordinator/health.h"
#include "process/process_main.h"
#include "security/auth.h"
#include "tests/process/fakes.h"
#include "tests/security/test_credentials.h"

namespace loopmoe::security {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using grpc::StatusCode;

using CoordinatorCall = std::function<grpc::Status(v1::Coordinator::Stub&, grpc::ClientContext*)>;
using ProcessCall = std::function<grpc::Status(v1::TrainingProcess::Stub&, grpc::ClientContext*)>;

std::string job_config() {
  return std::string(process::testing::kTestConfig) +
         "steps = 4\nwarmup_steps = 0\nlog_interval = 2\ncheckpoint_interval = 2\n";
}

v1::JobSpec job_spec(const std::string& output_dir = "") {
  v1::JobSpec spec;
  spec.set_name("secured");
  spec.set_config_toml(job_config());
  spec.set_num_workers(1);
  spec.set_num_shards(1);
  spec.set_output_dir(output_dir);
  return spec;
}

// One call of every Coordinator method, keyed by method name.
std::map<std::string, CoordinatorCall> coordinator_calls() {
  return {
      {"SubmitJob",
       [](v1::Coordinator::Stub& s, grpc::ClientContext* c) {
         v1::SubmitJobRequest r;
         *r.mutable_spec() = job_spec();
         v1::SubmitJobResponse out;
         return s.SubmitJob(c, r, &out);
       }},
      {"GetJob",
       [](v1::Coordinator::Stub& s, grpc::ClientContext* c) {
         v1::GetJobRequest r;
         r.set_job_id("1");
         v1::JobStatus out;
         return s.GetJob(c, r, &out);
       }},
      {"ListJobs",
       [](v1::Coordinator::Stub& s, grpc::ClientContext* c) {
         v1::ListJobsResponse out;
         return s.ListJobs(c, v1::ListJobsRequest(), &out);
       }},
      {"CancelJob",
       [](v1::Coordinator::Stub& s, grpc::ClientContext* c) {
         v1::CancelJobRequest r;
         r.set_job_id("1");
         v1::JobStatus out;
         return s.CancelJob(c, r, &out);
       }},
      {"WatchJob",
       [](v1::Coordinator::Stub& s, grpc::ClientContext* c) {
         v1::WatchJobRequest r;
         r.set_job_id("1");
         auto reader = s.WatchJob(c, r);
         v1::LogLine line;
         while (reader->Read(&line)) {
         }
         return reader->Finish();
       }},
      {"ListCheckpoints",
       [](v1::Coordinator::Stub& s, grpc::ClientContext* c) {
         v1::ListCheckpointsRequest r;
         r.set_job_id("1");
         v1::ListCheckpointsResponse out;
         return s.ListCheckpoints(c, r, &out);
       }},
      {"Register",
       [](v1::Coordinator::Stub& s, grpc::ClientContext* c) {
         v1::RegisterRequest r;
         r.set_role(v1::WORKER);
         r.set_address("127.0.0.1:9");
         v1::RegisterResponse out;
         return s.Register(c, r, &out);
       }},
      {"Heartbeat",
       [](v1::Coordinator::Stub& s, grpc::ClientContext* c) {
         v1::HeartbeatRequest r;
         r.set_process_id("worker-1");
         v1::HeartbeatResponse out;
         return s.Heartbeat(c, r, &out);
       }},
      {"KvSet",
       [](v1::Coordinator::Stub& s, grpc::ClientContext* c) {
         v1::KvSetRequest r;
         r.set_key("job/1/epoch/0/addr");
         r.set_value("forged");
         v1::KvSetResponse out;
         return s.KvSet(c, r, &out);
       }},
      {"KvGet",
       [](v1::Coordinator::Stub& s, grpc::ClientContext* c) {
         v1::KvGetRequest r;
         r.set_key("job/1/epoch/0/addr");
         v1::KvGetResponse out;
         return s.KvGet(c, r, &out);
       }},
      {"KvWait",
       [](v1::Coordinator::Stub& s, grpc::ClientContext* c) {
         v1::KvWaitRequest r;
         r.add_keys("job/1/epoch/0/addr");
         r.set_timeout_ms(0);
         v1::KvWaitResponse out;
         return s.KvWait(c, r, &out);
       }},
  };
}

// One call of every TrainingProcess method. Shutdown asks the process to exit.
std::map<std::string, ProcessCall> process_calls() {
  return {
      {"Configure",
       [](v1::TrainingProcess::Stub& s, grpc::ClientContext* c) {
         v1::ConfigureRequest r;
         r.set_job_id("1");
         r.set_role(v1::WORKER);
         r.set_num_workers(1);
         r.set_num_shards(1);
         r.set_config_toml(job_config());
         r.set_rendezvous_prefix("job/1/epoch/0/");
         r.set_output_dir("/tmp/forged");
         v1::ConfigureResponse out;
         return s.Configure(c, r, &out);
       }},
      {"RunSteps",
       [](v1::TrainingProcess::Stub& s, grpc::ClientContext* c) {
         v1::RunStepsRequest r;
         r.set_job_id("1");
         r.add_loops(1);
         v1::RunStepsResponse out;
         return s.RunSteps(c, r, &out);
       }},
      {"Evaluate",
       [](v1::TrainingProcess::Stub& s, grpc::ClientContext* c) {
         v1::EvaluateRequest r;
         r.set_job_id("1");
         r.set_batches(1);
         v1::EvaluateResponse out;
         return s.Evaluate(c, r, &out);
       }},
      {"Checkpoint",
       [](v1::TrainingProcess::Stub& s, grpc::ClientContext* c) {
         v1::CheckpointRequest r;
         r.set_job_id("1");
         r.set_step(1);
         r.set_dir("/tmp/forged");
         v1::CheckpointResponse out;
         return s.Checkpoint(c, r, &out);
       }},
      {"Shutdown",
       [](v1::TrainingProcess::Stub& s, grpc::ClientContext* c) {
         v1::ShutdownRequest r;
         r.set_exit(true);
         v1::ShutdownResponse out;
         return s.Shutdown(c, r, &out);
       }},
  };
}

// A service of proto/loopmoe.proto, as protobuf describes it.
const google::protobuf::ServiceDescriptor* service(const char* name) {
  return v1::JobSpec::descriptor()->file()->FindServiceByName(name);
}

std::set<std::string> method_names(const google::protobuf::ServiceDescriptor* service) {
  std::set<std::string> names;
  for (int i = 0; i < service->method_count(); ++i) names.insert(service->method(i)->name());
  return names;
}

template <class Map>
std::set<std::string> keys(const Map& map) {
  std::set<std::string> out;
  for (const auto& [k, v] : map) out.insert(k);
  return out;
}

bool refused(StatusCode code) {
  return code == StatusCode::UNAUTHENTICATED || code == StatusCode::PERMISSION_DENIED;
}

class SecuredServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::temp_directory_path() / "loopmoe-secured-XXXXXX").string();
    dir_ = mkdtemp(pattern.data());
    fs::create_directories(dir_ / "root");
    coordinator::CoordinatorOptions o;
    o.listen = "127.0.0.1:0";
    o.data_dir = (dir_ / "coordinator").string();
    o.data_root = (dir_ / "root").string();
    o.heartbeat_timeout = 2000ms;
    o.configure_timeout = 20s;
    o.step_timeout = 20s;
    o.shutdown_timeout = 1s;
    o.check_data = false;
    o.security = testing::coordinator_credentials();
    coordinator_ = std::make_unique<coordinator::Coordinator>(o);
  }
  void TearDown() override {
    for (auto& host : hosts_) host->stop(1s);
    hosts_.clear();
    coordinator_->shutdown();
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }

  // A coordinator stub that sends `token` over a channel made with `credentials`.
  std::unique_ptr<v1::Coordinator::Stub> stub(const Credentials& credentials,
                                              const std::string& token) {
    return v1::Coordinator::NewStub(create_channel(coordinator_->address(), credentials, token));
  }
  std::unique_ptr<grpc::ClientContext> context() {
    auto c = std::make_unique<grpc::ClientContext>();
    c->set_deadline(std::chrono::system_clock::now() + 10s);
    return c;
  }
  grpc::Status call(const CoordinatorCall& f, const Credentials& credentials,
                    const std::string& token) {
    auto s = stub(credentials, token);
    auto c = context();
    return f(*s, c.get());
  }
  // A training process (fake runtime) secured with the process credentials.
  process::ProcessHost& start_process(runtime::Role role) {
    process::ProcessOptions o;
    o.role = role;
    o.coordinator = coordinator_->address();
    o.listen = "127.0.0.1:0";
    o.name = "secured";
    o.connect_timeout = 10s;
    o.security = process_;
    hosts_.push_back(
        std::make_unique<process::ProcessHost>(o, process::testing::fake_factory(log_)));
    hosts_.back()->start();
    return *hosts_.back();
  }

  fs::path dir_;
  std::unique_ptr<coordinator::Coordinator> coordinator_;
  const Credentials cli_ = testing::cli_credentials();
  const Credentials process_ = testing::process_credentials();
  // The CA only: a client that shows no certificate.
  const Credentials no_cert_ = [] {
    Credentials c;
    c.ca_pem = testing::cli_credentials().ca_pem;
    return c;
  }();
  std::shared_ptr<process::testing::FakeRuntimeLog> log_ =
      std::make_shared<process::testing::FakeRuntimeLog>();
  std::vector<std::unique_ptr<process::ProcessHost>> hosts_;
};

TEST_F(SecuredServiceTest, TheTablesCoverEveryMethod) {
  EXPECT_EQ(keys(coordinator_calls()), method_names(service("Coordinator")));
  EXPECT_EQ(keys(process_calls()), method_names(service("TrainingProcess")));
}

TEST_F(SecuredServiceTest, EveryCoordinatorRpcRefusesMissingOrWrongCredentials) {
  const std::string wrong = random_token();
  for (const auto& [name, f] : coordinator_calls()) {
    const bool control =
        *method_permission("/loopmoe.v1.Coordinator/" + name) == Permission::kControl;
    EXPECT_EQ(call(f, no_cert_, "").error_code(), StatusCode::UNAUTHENTICATED) << name;
    EXPECT_EQ(call(f, process_, wrong).error_code(), StatusCode::UNAUTHENTICATED) << name;
    EXPECT_EQ(call(f, cli_, wrong).error_code(), StatusCode::UNAUTHENTICATED) << name;
    if (control) {
      // A process token is not a CLI token.
      EXPECT_EQ(call(f, process_, process_.process_token).error_code(),
                StatusCode::PERMISSION_DENIED)
          << name;
    } else {
      // A CLI token cannot impersonate a process, and a process token needs the certificate.
      EXPECT_EQ(call(f, cli_, cli_.cli_token).error_code(), StatusCode::PERMISSION_DENIED) << name;
      EXPECT_EQ(call(f, no_cert_, process_.process_token).error_code(), StatusCode::UNAUTHENTICATED)
          << name;
    }
  }
  // The right credentials get through (to whatever the handler answers).
  for (const auto& [name, f] : coordinator_calls()) {
    const bool control =
        *method_permission("/loopmoe.v1.Coordinator/" + name) == Permission::kControl;
    const grpc::Status status =
        control ? call(f, cli_, cli_.cli_token) : call(f, process_, process_.process_token);
    EXPECT_FALSE(refused(status.error_code())) << name << ": " << status.error_message();
  }
}

TEST_F(SecuredServiceTest, WrongPermissionExecutesNothing) {
  const auto calls = coordinator_calls();
  EXPECT_EQ(call(calls.at("SubmitJob"), process_, process_.process_token).error_code(),
            StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(call(calls.at("KvSet"), cli_, cli_.cli_token).error_code(),
            StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(call(calls.at("Register"), cli_, cli_.cli_token).error_code(),
            StatusCode::PERMISSION_DENIED);
  // No job was created and the KV is unchanged.
  auto cli = stub(cli_, cli_.cli_token);
  auto c = context();
  v1::ListJobsResponse jobs;
  ASSERT_TRUE(cli->ListJobs(c.get(), v1::ListJobsRequest(), &jobs).ok());
  EXPECT_EQ(jobs.jobs_size(), 0);
  auto process = stub(process_, process_.process_token);
  c = context();
  v1::KvGetRequest get;
  get.set_key("job/1/epoch/0/addr");
  v1::KvGetResponse value;
  ASSERT_TRUE(process->KvGet(c.get(), get, &value).ok());
  EXPECT_FALSE(value.found());
}

TEST_F(SecuredServiceTest, TlsIsRequiredAndHealthIsOpen) {
  auto plain = v1::Coordinator::NewStub(
      grpc::CreateChannel(coordinator_->address(), grpc::InsecureChannelCredentials()));
  auto c = context();
  c->set_deadline(std::chrono::system_clock::now() + 3s);
  v1::ListJobsResponse jobs;
  const grpc::Status status = plain->ListJobs(c.get(), v1::ListJobsRequest(), &jobs);
  EXPECT_EQ(status.error_code(), StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_FALSE(
      coordinator::check_health(
          grpc::CreateChannel(coordinator_->address(), grpc::InsecureChannelCredentials()), 2000ms)
          .ok);
  // A client that does not trust the CA fails the handshake too.
  Credentials other;
  other.ca_pem = read_pem(generate_credentials(dir_ / "other").ca.string(), "CA");
  EXPECT_EQ(call(coordinator_calls().at("ListJobs"), other, cli_.cli_token).error_code(),
            StatusCode::UNAVAILABLE);
  // Health answers over TLS without any token.
  EXPECT_TRUE(
      coordinator::check_health(create_channel(coordinator_->address(), no_cert_, ""), 5000ms)
          .serving());
}

TEST_F(SecuredServiceTest, ThePlaintextHealthPortServesHealthOnly) {
  coordinator_->shutdown();
  coordinator::CoordinatorOptions o;
  o.listen = "127.0.0.1:0";
  o.data_dir = (dir_ / "coordinator2").string();  // the first one keeps its database open
  o.health_listen = "127.0.0.1:0";
  o.check_data = false;
  o.security = testing::coordinator_credentials();
  coordinator_ = std::make_unique<coordinator::Coordinator>(o);
  ASSERT_FALSE(coordinator_->health_address().empty());
  auto plain =
      grpc::CreateChannel(coordinator_->health_address(), grpc::InsecureChannelCredentials());
  EXPECT_TRUE(coordinator::check_health(plain, 5000ms).serving());
  // Nothing else is served there, with or without a token.
  auto stub = v1::Coordinator::NewStub(plain);
  auto c = context();
  v1::ListJobsResponse jobs;
  EXPECT_EQ(stub->ListJobs(c.get(), v1::ListJobsRequest(), &jobs).error_code(),
            StatusCode::UNIMPLEMENTED);
  coordinator_->shutdown();
  EXPECT_FALSE(coordinator::check_health(plain, 1000ms).serving());
}

TEST_F(SecuredServiceTest, OutputDirMustStayUnderTheDataRoot) {
  auto cli = stub(cli_, cli_.cli_token);
  fs::create_directories(dir_ / "elsewhere");
  fs::create_directory_symlink(dir_ / "elsewhere", dir_ / "root" / "escape");
  for (const fs::path& bad : {dir_ / "root" / ".." / "elsewhere", fs::path("/tmp"),
                              dir_ / "root" / "escape" / "run", fs::path("../elsewhere")}) {
    auto c = context();
    v1::SubmitJobRequest request;
    *request.mutable_spec() = job_spec(bad.string());
    v1::SubmitJobResponse response;
    const grpc::Status status = cli->SubmitJob(c.get(), request, &response);
    EXPECT_EQ(status.error_code(), StatusCode::INVALID_ARGUMENT) << bad;
    EXPECT_NE(status.error_message().find("job spec: output_dir: "), std::string::npos)
        << status.error_message();
    EXPECT_NE(status.error_message().find("outside the coordinator's data root"), std::string::npos)
        << status.error_message();
  }
  auto c = context();
  v1::ListJobsResponse jobs;
  ASSERT_TRUE(cli->ListJobs(c.get(), v1::ListJobsRequest(), &jobs).ok());
  EXPECT_EQ(jobs.jobs_size(), 0);

  c = context();
  v1::SubmitJobRequest request;
  *request.mutable_spec() = job_spec((dir_ / "root" / "runs" / "." / "a").string());
  v1::SubmitJobResponse response;
  ASSERT_TRUE(cli->SubmitJob(c.get(), request, &response).ok());
  c = context();
  v1::GetJobRequest get;
  get.set_job_id(response.job_id());
  v1::JobStatus job;
  ASSERT_TRUE(cli->GetJob(c.get(), get, &job).ok());
  EXPECT_EQ(job.spec().output_dir(), (fs::canonical(dir_ / "root") / "runs" / "a").string());
}

TEST_F(SecuredServiceTest, EveryProcessRpcRefusesCliAndWrongCredentials) {
  process::ProcessHost& host = start_process(runtime::Role::kWorker);
  auto process_stub = [&](const Credentials& credentials, const std::string& token) {
    return v1::TrainingProcess::NewStub(create_channel(host.address(), credentials, token));
  };
  const std::string wrong = random_token();
  for (const auto& [name, f] : process_calls()) {
    const std::vector<std::pair<std::string, std::unique_ptr<v1::TrainingProcess::Stub>>> clients =
        [&] {
          std::vector<std::pair<std::string, std::unique_ptr<v1::TrainingProcess::Stub>>> v;
          v.emplace_back("no token", process_stub(no_cert_, ""));
          v.emplace_back("wrong token", process_stub(process_, wrong));
          v.emplace_back("CLI token", process_stub(cli_, cli_.cli_token));
          v.emplace_back("process token without certificate",
                         process_stub(no_cert_, process_.process_token));
          return v;
        }();
    for (const auto& [what, client] : clients) {
      auto c = context();
      const grpc::Status status = f(*client, c.get());
      EXPECT_TRUE(refused(status.error_code()))
          << name << " with " << what << ": " << status.error_code() << " "
          << status.error_message();
      if (what != "CLI token") {
        EXPECT_EQ(status.error_code(), StatusCode::UNAUTHENTICATED) << name << " with " << what;
      }
    }
  }
  // Nothing ran: no runtime was configured and no exit was requested.
  EXPECT_FALSE(host.wait_for_exit_request(0ms));
  {
    std::lock_guard lock(log_->mutex);
    EXPECT_TRUE(log_->setups.empty());
    EXPECT_TRUE(log_->checkpoint_dirs.empty());
  }
  // Health is open on the process too.
  EXPECT_TRUE(
      coordinator::check_health(create_channel(host.address(), no_cert_, ""), 5000ms).serving());
  // The coordinator's credentials get through.
  auto c = context();
  v1::ShutdownRequest shutdown;
  v1::ShutdownResponse response;
  const grpc::Status status =
      process_stub(process_, process_.process_token)->Shutdown(c.get(), shutdown, &response);
  EXPECT_TRUE(status.ok()) << status.error_message();
}

TEST_F(SecuredServiceTest, AJobRunsWithEverythingAuthenticated) {
  start_process(runtime::Role::kWorker);
  start_process(runtime::Role::kExpertShard);
  auto cli = stub(cli_, cli_.cli_token);
  auto c = context();
  v1::SubmitJobRequest request;
  *request.mutable_spec() = job_spec();
  v1::SubmitJobResponse response;
  ASSERT_TRUE(cli->SubmitJob(c.get(), request, &response).ok());
  v1::JobStatus job;
  ASSERT_TRUE(process::testing::eventually(
      [&] {
        auto c = context();
        v1::GetJobRequest get;
        get.set_job_id(response.job_id());
        return cli->GetJob(c.get(), get, &job).ok() &&
               (job.state() == v1::SUCCEEDED || job.state() == v1::FAILED);
      },
      30s));
  EXPECT_EQ(job.state(), v1::SUCCEEDED) << job.error();
  EXPECT_EQ(job.step(), 4);
  EXPECT_EQ(job.last_checkpoint_step(), 4);
}

}  // namespace
}  // namespace loopmoe::security
