// Tests for the rendezvous stores: InProcessStore, FileStore, NamespacedStore, the Gloo adapter
// and the NCCL unique-id exchange (which needs no NCCL).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <thread>

#include "comm/comm_error.h"
#include "comm/file_store.h"
#include "comm/gloo_store_adapter.h"
#include "comm/in_process_store.h"
#include "comm/key_value_store.h"
#include "comm/nccl_unique_id.h"
#include "tests/comm/comm_test_util.h"

namespace loopmoe::comm {
namespace {

using std::chrono::milliseconds;
using testing::TempDir;
using Clock = std::chrono::steady_clock;

long elapsed_ms(Clock::time_point start) {
  return static_cast<long>(std::chrono::duration_cast<milliseconds>(Clock::now() - start).count());
}

// The same contract for both implementations.
class StoreTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    if (std::string(GetParam()) == "file") {
      store_ = std::make_unique<FileStore>(dir_.path() / "store");
    } else {
      store_ = std::make_unique<InProcessStore>();
    }
  }

  TempDir dir_;
  std::unique_ptr<KeyValueStore> store_;
};

TEST_P(StoreTest, SetGetOverwriteAndMissing) {
  EXPECT_EQ(store_->get("absent"), std::nullopt);
  store_->set("a/b", "one");
  EXPECT_EQ(store_->get("a/b"), "one");
  store_->set("a/b", "two");  // last writer wins
  EXPECT_EQ(store_->get("a/b"), "two");
  store_->set("empty", "");
  EXPECT_EQ(store_->get("empty"), "");
}

TEST_P(StoreTest, ValuesAreBinarySafe) {
  std::string bytes;
  for (int i = 0; i < 256; ++i) bytes += static_cast<char>(i);
  bytes += bytes;
  store_->set("bin", bytes);
  EXPECT_EQ(store_->get("bin"), bytes);
}

TEST_P(StoreTest, KeysWithAwkwardCharactersStayDistinct) {
  // The file store encodes keys into file names; different keys must never share a file.
  const std::vector<std::string> keys = {"x/y", "x%2Fy", "x.y", ".tmp.x", "x y", "x_y", "X/Y"};
  for (size_t i = 0; i < keys.size(); ++i) store_->set(keys[i], std::to_string(i));
  for (size_t i = 0; i < keys.size(); ++i) EXPECT_EQ(store_->get(keys[i]), std::to_string(i));
}

TEST_P(StoreTest, WaitReturnsOnceAllKeysAreSet) {
  std::thread writer([&] {
    std::this_thread::sleep_for(milliseconds(50));
    store_->set("k1", "1");
    std::this_thread::sleep_for(milliseconds(50));
    store_->set("k2", "2");
  });
  const auto start = Clock::now();
  store_->wait({"k1", "k2"}, milliseconds(5000));
  EXPECT_GE(elapsed_ms(start), 90);
  EXPECT_EQ(store_->get("k2"), "2");
  writer.join();
  store_->wait({"k1", "k2"}, milliseconds(1));  // already there: returns at once
  EXPECT_EQ(wait_and_get(*store_, "k1", milliseconds(1)), "1");
}

TEST_P(StoreTest, WaitTimesOutNamingTheMissingKey) {
  store_->set("present", "x");
  const auto start = Clock::now();
  try {
    store_->wait({"present", "job/j/epoch/0/gloo/world/1"}, milliseconds(200));
    FAIL() << "wait did not time out";
  } catch (const TimeoutError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("job/j/epoch/0/gloo/world/1"), std::string::npos) << message;
    EXPECT_EQ(message.find("'present'"), std::string::npos) << message;
    EXPECT_NE(message.find("200 ms"), std::string::npos) << message;
  }
  const long ms = elapsed_ms(start);
  EXPECT_GE(ms, 190);
  EXPECT_LT(ms, 1500);
  EXPECT_THROW(wait_and_get(*store_, "nope", milliseconds(10)), TimeoutError);
}

TEST_P(StoreTest, ConcurrentWritersAndWaiters) {
  constexpr int kThreads = 8;
  std::vector<std::string> errors = testing::run_ranks(kThreads, [&](int rank) {
    store_->set("rank/" + std::to_string(rank), std::string(1000, static_cast<char>('a' + rank)));
    for (int other = 0; other < kThreads; ++other) {
      const std::string value =
          wait_and_get(*store_, "rank/" + std::to_string(other), milliseconds(5000));
      if (value != std::string(1000, static_cast<char>('a' + other))) {
        throw std::runtime_error("torn or wrong value from " + std::to_string(other));
      }
    }
  });
  EXPECT_TRUE(errors.empty()) << ::testing::PrintToString(errors);
}

INSTANTIATE_TEST_SUITE_P(Stores, StoreTest, ::testing::Values("in_process", "file"),
                         [](const auto& info) { return std::string(info.param); });

TEST(FileStore, SeparateProcessesRendezvous) {
  TempDir dir;
  FileStore store(dir.path());
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // The child only touches the file store (no threads, no gtest), then leaves without running
    // the parent's atexit handlers.
    int code = 0;
    try {
      FileStore child_store(dir.path());
      child_store.set("from_child", "hello parent");
      code = wait_and_get(child_store, "from_parent", milliseconds(5000)) == "hello child" ? 0 : 2;
    } catch (...) {
      code = 1;
    }
    ::_exit(code);
  }
  store.set("from_parent", "hello child");
  EXPECT_EQ(wait_and_get(store, "from_child", milliseconds(5000)), "hello parent");
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

TEST(FileStore, LeavesNoTemporaryFiles) {
  TempDir dir;
  FileStore store(dir.path());
  for (int i = 0; i < 20; ++i) store.set("k", std::to_string(i));
  int files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir.path())) {
    ++files;
    EXPECT_EQ(entry.path().filename().string().rfind(".tmp", 0), std::string::npos);
  }
  EXPECT_EQ(files, 1);
}

TEST(NamespacedStore, PrefixesEveryKey) {
  InProcessStore base;
  NamespacedStore job(base, "job-42", 3);
  EXPECT_EQ(job.prefix(), "job/job-42/epoch/3/");
  job.set("gloo/world/0", "addr");
  EXPECT_EQ(base.get("job/job-42/epoch/3/gloo/world/0"), "addr");
  EXPECT_EQ(job.get("gloo/world/0"), "addr");
  EXPECT_EQ(base.get("gloo/world/0"), std::nullopt);
  job.wait({"gloo/world/0"}, milliseconds(1));

  // A restart (next epoch) sees nothing of its predecessor.
  NamespacedStore restarted(base, "job-42", 4);
  EXPECT_EQ(restarted.get("gloo/world/0"), std::nullopt);
  EXPECT_THROW(restarted.wait({"gloo/world/0"}, milliseconds(20)), TimeoutError);

  // Namespaces nest: a communicator group under the job namespace.
  NamespacedStore group(job, "gloo/world/");
  EXPECT_EQ(group.get("0"), "addr");
}

TEST(NamespacedStore, TimeoutNamesTheFullKey) {
  InProcessStore base;
  NamespacedStore job(base, "j", 0);
  try {
    job.wait({"nccl/world/unique_id"}, milliseconds(10));
    FAIL();
  } catch (const TimeoutError& e) {
    EXPECT_NE(std::string(e.what()).find("job/j/epoch/0/nccl/world/unique_id"), std::string::npos)
        << e.what();
  }
}

TEST(NamespacedStore, RejectsBadJobIdsAndEpochs) {
  EXPECT_EQ(rendezvous_namespace("a", 0), "job/a/epoch/0/");
  EXPECT_THROW(rendezvous_namespace("", 0), std::invalid_argument);
  EXPECT_THROW(rendezvous_namespace("a/b", 0), std::invalid_argument);
  EXPECT_THROW(rendezvous_namespace("a", -1), std::invalid_argument);
}

TEST(GlooStoreAdapter, MapsGlooCallsOntoTheStore) {
  InProcessStore base;
  GlooStoreAdapter adapter(base, milliseconds(200));
  const std::vector<char> bytes = {'\0', 'x', '\xff'};
  adapter.set("0", bytes);
  EXPECT_EQ(base.get("0"), std::string(bytes.begin(), bytes.end()));
  EXPECT_EQ(adapter.get("0"), bytes);
  adapter.wait({"0"});
  adapter.wait({"0"}, milliseconds(1));
  // Gloo calls get() on keys it has waited for; a missing one must not block forever.
  const auto start = Clock::now();
  EXPECT_THROW(adapter.get("1"), TimeoutError);
  EXPECT_LT(elapsed_ms(start), 1500);
  EXPECT_THROW(adapter.wait({"1"}, milliseconds(10)), TimeoutError);
}

TEST(NcclUniqueId, RankZeroPublishesOthersLookUp) {
  InProcessStore base;
  NamespacedStore store(base, "nccl-job", 7);
  const std::string id(kNcclUniqueIdBytes, '\x5a');
  std::vector<std::string> seen(3);
  std::vector<std::string> errors = testing::run_ranks(3, [&](int rank) {
    seen[rank] = exchange_nccl_unique_id(store, rank, "world", milliseconds(5000), [&] {
      if (rank != 0) throw std::runtime_error("only rank 0 may create the id");
      return id;
    });
  });
  ASSERT_TRUE(errors.empty()) << ::testing::PrintToString(errors);
  for (const std::string& s : seen) EXPECT_EQ(s, id);
  EXPECT_EQ(nccl_unique_id_key("world"), "nccl/world/unique_id");
  EXPECT_EQ(base.get("job/nccl-job/epoch/7/nccl/world/unique_id"), id);
}

TEST(NcclUniqueId, MissingOrMalformedIdsFailClearly) {
  InProcessStore store;
  auto never = []() -> std::string { throw std::runtime_error("not rank 0"); };
  EXPECT_THROW(exchange_nccl_unique_id(store, 1, "g", milliseconds(20), never), TimeoutError);
  store.set(nccl_unique_id_key("g"), "short");
  EXPECT_THROW(exchange_nccl_unique_id(store, 1, "g", milliseconds(20), never), CommError);
  EXPECT_THROW(exchange_nccl_unique_id(store, 0, "h", milliseconds(20), [] { return "x"; }),
               CommError);
}

}  // namespace
}  // namespace loopmoe::comm
