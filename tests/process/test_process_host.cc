// ProcessHost in this process: registration, heartbeats, re-registration, health, exit requests,
// and the failure when the coordinator cannot be reached.
#include <grpcpp/create_channel.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>
#include <gtest/gtest.h>

#include <future>

#include "process/process_main.h"
#include "security/credentials.h"
#include "tests/process/fakes.h"

namespace loopmoe::process {
namespace {

namespace pb = loopmoe::v1;
using namespace std::chrono_literals;
using testing::eventually;
using testing::FakeCoordinator;

class ProcessHostTest : public ::testing::Test {
 protected:
  ProcessOptions options(runtime::Role role) {
    ProcessOptions o;
    o.role = role;
    o.coordinator = coordinator_server_->address;
    o.listen = "127.0.0.1:0";
    o.name = "test-host/1";
    o.connect_timeout = 5s;
    o.security = security::Credentials::Insecure();  // the fake coordinator serves plaintext
    return o;
  }

  int heartbeats_from(const std::string& id) {
    int n = 0;
    for (const std::string& beat : coordinator_.heartbeat_ids()) n += beat == id;
    return n;
  }

  FakeCoordinator coordinator_;
  std::unique_ptr<testing::TestServer> coordinator_server_ = testing::serve({&coordinator_});
  std::shared_ptr<testing::FakeRuntimeLog> log_ = std::make_shared<testing::FakeRuntimeLog>();
};

TEST_F(ProcessHostTest, RegistersThenHeartbeats) {
  coordinator_.set_heartbeat_interval_ms(30);
  ProcessOptions o = options(runtime::Role::kExpertShard);
  o.metrics_listen = "127.0.0.1:0";
  o.hostname = "127.0.0.1";
  ProcessHost host(o, testing::fake_factory(log_));
  host.start();
  const std::vector<pb::RegisterRequest> registrations = coordinator_.registrations();
  ASSERT_EQ(registrations.size(), 1u);
  EXPECT_EQ(registrations[0].role(), pb::EXPERT_SHARD);
  EXPECT_EQ(registrations[0].address(), host.address());
  EXPECT_EQ(registrations[0].name(), "test-host/1");
  EXPECT_EQ(registrations[0].metrics_address(), host.metrics_address());
  EXPECT_TRUE(host.address().starts_with("127.0.0.1:")) << host.address();
  EXPECT_NE(host.address(), "127.0.0.1:0");
  EXPECT_TRUE(host.metrics_address().starts_with("127.0.0.1:")) << host.metrics_address();
  EXPECT_EQ(host.process_id(), "p-1");
  EXPECT_TRUE(eventually([&] { return heartbeats_from("p-1") >= 3; }))
      << coordinator_.heartbeat_ids().size() << " heartbeats";
  // Acknowledged heartbeats keep the age near the interval.
  EXPECT_NE(host.metrics().text().find("loopmoe_heartbeat_age_seconds"), std::string::npos);
}

TEST_F(ProcessHostTest, DefaultNameIsHostnameSlashPid) {
  ProcessOptions o = options(runtime::Role::kWorker);
  o.name.clear();
  ProcessHost host(o, testing::fake_factory(log_));
  host.start();
  const std::string name = coordinator_.registrations().at(0).name();
  EXPECT_TRUE(name.ends_with("/" + std::to_string(getpid()))) << name;
  EXPECT_EQ(coordinator_.registrations().at(0).metrics_address(), "") << "no metrics server";
}

TEST_F(ProcessHostTest, RegistersAgainWhenTheCoordinatorForgetsIt) {
  coordinator_.set_heartbeat_interval_ms(30);
  ProcessHost host(options(runtime::Role::kWorker), testing::fake_factory(log_));
  host.start();
  ASSERT_TRUE(eventually([&] { return heartbeats_from("p-1") >= 1; }));
  coordinator_.forget_processes();  // as after a coordinator restart
  ASSERT_TRUE(eventually([&] { return coordinator_.registrations().size() == 2; }));
  EXPECT_EQ(coordinator_.registrations()[1].address(), host.address());
  EXPECT_TRUE(eventually([&] { return host.process_id() == "p-2"; }));
  EXPECT_TRUE(eventually([&] { return heartbeats_from("p-2") >= 2; }));
  EXPECT_EQ(coordinator_.registrations().size(), 2u) << "registers once, not on every beat";
}

TEST_F(ProcessHostTest, ServesTrainingProcessHealthAndExitRequests) {
  ProcessHost host(options(runtime::Role::kWorker), testing::fake_factory(log_));
  host.start();
  auto channel = grpc::CreateChannel(host.address(), grpc::InsecureChannelCredentials());

  // grpc.health.v1.Health/Check with an empty request (service ""): SERVING is bytes 08 01.
  grpc::GenericStub generic(channel);
  grpc::ClientContext health_context;
  health_context.set_deadline(std::chrono::system_clock::now() + 5s);
  grpc::Slice no_bytes("");
  grpc::ByteBuffer empty(&no_bytes, 1), health_response;
  std::promise<grpc::Status> done;
  generic.UnaryCall(&health_context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &empty,
                    &health_response, [&](grpc::Status status) { done.set_value(status); });
  grpc::Status health = done.get_future().get();
  ASSERT_TRUE(health.ok()) << health.error_message();
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(health_response.Dump(&slices).ok());
  std::string bytes;
  for (const grpc::Slice& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  EXPECT_EQ(bytes, std::string("\x08\x01", 2));

  auto stub = pb::TrainingProcess::NewStub(channel);
  pb::ConfigureRequest configure;
  configure.set_job_id("j1");
  configure.set_role(pb::WORKER);
  configure.set_num_workers(1);
  configure.set_num_shards(1);
  configure.set_config_toml(testing::kTestConfig);
  pb::ConfigureResponse configured;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub->Configure(&context, configure, &configured).ok());
  }
  // Rendezvous keys went to the coordinator, namespaced.
  EXPECT_EQ(coordinator_.kv().count("job/j1/epoch/0/hello"), 1u);

  EXPECT_FALSE(host.wait_for_exit_request(0ms));
  pb::ShutdownRequest shutdown;
  shutdown.set_exit(true);
  pb::ShutdownResponse response;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub->Shutdown(&context, shutdown, &response).ok());
  }
  EXPECT_TRUE(host.wait_for_exit_request(5s));
  host.stop();
  host.stop();  // idempotent
}

TEST_F(ProcessHostTest, UnreachableCoordinatorFailsWithOneClearMessage) {
  ProcessOptions o = options(runtime::Role::kWorker);
  o.coordinator = "127.0.0.1:1";
  o.connect_timeout = 600ms;
  ProcessHost host(o, testing::fake_factory(log_));
  const auto start = std::chrono::steady_clock::now();
  try {
    host.start();
    FAIL() << "started without a coordinator";
  } catch (const std::runtime_error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("cannot reach the coordinator at 127.0.0.1:1"), std::string::npos)
        << message;
    EXPECT_NE(message.find("0.6 s"), std::string::npos) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  }
  const auto waited = std::chrono::steady_clock::now() - start;
  EXPECT_GE(waited, 400ms);
  EXPECT_LT(waited, 5s);
}

TEST_F(ProcessHostTest, WaitsForACoordinatorThatStartsLate) {
  // Take a free port for the coordinator, but start it only after the host began trying.
  FakeCoordinator late;
  std::unique_ptr<grpc::Server> late_server;  // declared after the service it serves
  std::string address;
  {
    auto probe = testing::serve({&late});
    address = probe->address;
  }
  ProcessOptions o = options(runtime::Role::kWorker);
  o.coordinator = address;
  o.connect_timeout = 10s;
  ProcessHost host(o, testing::fake_factory(log_));
  std::thread starter([&] {
    std::this_thread::sleep_for(700ms);
    grpc::ServerBuilder builder;
    int port = 0;
    security::add_exclusive_listening_port(builder, address, grpc::InsecureServerCredentials(),
                                           &port);
    builder.RegisterService(&late);
    late_server = builder.BuildAndStart();
  });
  const auto start = std::chrono::steady_clock::now();
  host.start();
  const auto waited = std::chrono::steady_clock::now() - start;
  starter.join();
  EXPECT_EQ(late.registrations().size(), 1u);
  EXPECT_GE(waited, 500ms);
  EXPECT_LT(waited, 6s) << "reconnect backoff too long";
  host.stop();
  ASSERT_NE(late_server, nullptr);
  late_server->Shutdown(std::chrono::system_clock::now() + 1s);
}

}  // namespace
}  // namespace loopmoe::process
