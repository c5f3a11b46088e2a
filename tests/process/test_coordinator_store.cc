// CoordinatorStore against a fake Coordinator over real gRPC on loopback.
#include <gtest/gtest.h>

#include <thread>

#include "comm/comm_error.h"
#include "comm/gloo_communicator.h"
#include "comm/nccl_unique_id.h"
#include "process/coordinator_store.h"
#include "tests/process/fakes.h"

namespace loopmoe::process {
namespace {

using namespace std::chrono_literals;
using testing::FakeCoordinator;

class CoordinatorStoreTest : public ::testing::Test {
 protected:
  FakeCoordinator coordinator_;
  std::unique_ptr<testing::TestServer> server_ = testing::serve({&coordinator_});
  CoordinatorStore store_{server_->address};
};

TEST_F(CoordinatorStoreTest, SetThenGetRoundTripsBinaryValues) {
  const std::string value("a\0b\xff", 4);
  store_.set("job/j/epoch/0/gloo/world/1", value);
  EXPECT_EQ(coordinator_.kv().at("job/j/epoch/0/gloo/world/1"), value);
  EXPECT_EQ(store_.get("job/j/epoch/0/gloo/world/1"), value);
  EXPECT_EQ(store_.get("absent"), std::nullopt);
  store_.set("job/j/epoch/0/gloo/world/1", "replaced");
  EXPECT_EQ(store_.get("job/j/epoch/0/gloo/world/1"), "replaced");
}

TEST_F(CoordinatorStoreTest, WaitReturnsAtOnceForSetKeys) {
  store_.set("a", "1");
  store_.set("b", "2");
  const auto start = std::chrono::steady_clock::now();
  store_.wait({"a", "b"}, 5s);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 2s);
}

TEST_F(CoordinatorStoreTest, WaitIsReleasedByALaterSet) {
  store_.set_max_wait_slice(100ms);  // several KvWait calls before the key shows up
  std::thread setter([&] {
    std::this_thread::sleep_for(400ms);
    CoordinatorStore other(server_->address);
    other.set("late", "x");
  });
  const auto start = std::chrono::steady_clock::now();
  store_.wait({"late"}, 10s);
  const auto waited = std::chrono::steady_clock::now() - start;
  setter.join();
  EXPECT_GE(waited, 300ms);
  EXPECT_LT(waited, 5s);
  EXPECT_GE(coordinator_.kv_wait_calls(), 2);
}

TEST_F(CoordinatorStoreTest, WaitTimeoutNamesTheMissingKeys) {
  store_.set("present", "1");
  store_.set_max_wait_slice(100ms);
  const auto start = std::chrono::steady_clock::now();
  try {
    store_.wait({"present", "gloo/world/2", "gloo/world/3"}, 300ms);
    FAIL() << "wait() returned although keys are missing";
  } catch (const comm::TimeoutError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("'gloo/world/2'"), std::string::npos) << message;
    EXPECT_NE(message.find("'gloo/world/3'"), std::string::npos) << message;
    EXPECT_EQ(message.find("'present'"), std::string::npos) << message;
    EXPECT_NE(message.find("2 key(s)"), std::string::npos) << message;
    EXPECT_NE(message.find(server_->address), std::string::npos) << message;
  }
  const auto waited = std::chrono::steady_clock::now() - start;
  EXPECT_GE(waited, 250ms);
  EXPECT_LT(waited, 5s);
}

// What the store is for: Gloo's rendezvous and the NCCL unique id, through the coordinator's RPCs,
// namespaced by job and epoch. Three ranks, each with its own client.
TEST_F(CoordinatorStoreTest, GlooRendezvousAndNcclIdGoThroughTheCoordinator) {
  std::vector<std::string> ids(3), errors(3);
  std::vector<double> sums(3);
  std::vector<std::thread> ranks;
  for (int r = 0; r < 3; ++r) {
    ranks.emplace_back([&, r] {
      try {
        CoordinatorStore client(server_->address);
        comm::NamespacedStore store(client, "j7", 2);
        comm::GlooOptions options;
        options.timeout = 10s;
        options.rendezvous_timeout = 20s;
        auto world = comm::make_gloo_communicator(store, r, 3, options);
        double x = r + 1;
        world->allreduce_sum(&x, 1);
        sums[r] = x;
        ids[r] = comm::exchange_nccl_unique_id(store, r, "world", 10s,
                                               [] { return std::string(128, '\x2a'); });
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  }
  for (auto& t : ranks) t.join();
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(errors[r], "") << "rank " << r;
    EXPECT_EQ(sums[r], 6.0);
    EXPECT_EQ(ids[r], std::string(128, '\x2a'));
  }
  EXPECT_TRUE(coordinator_.kv().count("job/j7/epoch/2/nccl/world/unique_id"));
  bool gloo_keys = false;
  for (const auto& [key, value] : coordinator_.kv())
    gloo_keys |= key.starts_with("job/j7/epoch/2/gloo/");
  EXPECT_TRUE(gloo_keys);
}

TEST(CoordinatorStoreUnreachable, FailsQuicklyWithCommErrorNamingTheAddress) {
  // Port 1 (tcpmux) is privileged and unused: connections are refused at once.
  CoordinatorStore store("127.0.0.1:1");
  for (int operation = 0; operation < 3; ++operation) {
    const auto start = std::chrono::steady_clock::now();
    try {
      if (operation == 0) store.set("k", "v");
      if (operation == 1) store.get("k");
      if (operation == 2) store.wait({"k"}, 30s);
      FAIL() << "operation " << operation << " succeeded without a coordinator";
    } catch (const comm::TimeoutError& e) {
      FAIL() << "unreachable must be a CommError, not a timeout: " << e.what();
    } catch (const comm::CommError& e) {
      EXPECT_NE(std::string(e.what()).find("127.0.0.1:1"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("unreachable"), std::string::npos) << e.what();
    }
    EXPECT_LT(std::chrono::steady_clock::now() - start, 5s) << "operation " << operation;
  }
}

}  // namespace
}  // namespace loopmoe::process
