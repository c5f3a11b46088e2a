// The Gloo communicator over TCP on loopback, one thread per rank (each with its own Gloo context
// and TCP connections, exactly as separate processes would have), and the SIGPIPE guard it uses.
#include <gtest/gtest.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <future>
#include <memory>
#include <thread>

#include "comm/comm_error.h"
#include "comm/gloo_communicator.h"
#include "comm/in_process_store.h"
#include "comm/sigpipe_guard.h"
#include "tests/comm/comm_test_util.h"

namespace loopmoe::comm {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;
using testing::fast_gloo_options;
using testing::run_ranks;
using testing::test_job_id;

long elapsed_ms(Clock::time_point start) {
  return static_cast<long>(std::chrono::duration_cast<milliseconds>(Clock::now() - start).count());
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

GlooOptions options_for_group(std::string group) {
  GlooOptions options = fast_gloo_options();
  options.group = std::move(group);
  return options;
}

// Runs fn(comm) on `size` ranks connected through one in-process store.
void with_group(int size, const std::function<void(Communicator&)>& fn,
                GlooOptions options = fast_gloo_options()) {
  InProcessStore base;
  NamespacedStore store(base, test_job_id(), 0);
  std::vector<std::string> errors = run_ranks(size, [&](int rank) {
    std::unique_ptr<Communicator> comm = make_gloo_communicator(store, rank, size, options);
    if (comm->rank() != rank || comm->size() != size) throw std::runtime_error("rank/size");
    fn(*comm);
  });
  EXPECT_TRUE(errors.empty()) << ::testing::PrintToString(errors);
}

TEST(GlooCommunicator, AlltoallvWithZeroCountsThreeRanks) {
  // Rank 0 sends nothing, rank 2 receives nothing, rank 1 also sends to itself.
  with_group(3, [](Communicator& comm) {
    testing::check_alltoallv(comm, testing::zero_heavy_count);
    // Twice: a second exchange on the same communicator must not see leftovers of the first.
    testing::check_alltoallv(comm, testing::zero_heavy_count);
  });
}

TEST(GlooCommunicator, AlltoallvAllZero) {
  with_group(3, [](Communicator& comm) {
    const std::vector<int64_t> zeros(3, 0);
    EXPECT_EQ(comm.alltoall_counts(zeros), zeros);
    comm.alltoallv(static_cast<const float*>(nullptr), zeros, static_cast<float*>(nullptr), zeros);
  });
}

TEST(GlooCommunicator, AlltoallvUnevenThreeRanks) {
  with_group(3, [](Communicator& comm) {
    testing::check_alltoallv(comm, testing::uneven_count);
    testing::check_alltoallv_int64(comm);
  });
}

TEST(GlooCommunicator, AlltoallvUnevenTwoAndFourRanks) {
  for (int size : {2, 4}) {
    with_group(size,
               [](Communicator& comm) { testing::check_alltoallv(comm, testing::uneven_count); });
  }
}

TEST(GlooCommunicator, AllreduceExactAndIdenticalOnEveryRank) {
  with_group(3, [](Communicator& comm) { testing::check_allreduce(comm); });
}

TEST(GlooCommunicator, BroadcastFromEveryRoot) {
  with_group(3, [](Communicator& comm) { testing::check_broadcast(comm); });
}

TEST(GlooCommunicator, BarrierWaitsForEveryRank) {
  std::atomic<int> arrived{0};
  with_group(3, [&](Communicator& comm) {
    // The last rank is late; nobody may leave the barrier before it has arrived.
    if (comm.rank() == 2) std::this_thread::sleep_for(milliseconds(200));
    arrived.fetch_add(1);
    comm.barrier();
    if (arrived.load() != 3) throw std::runtime_error("left the barrier before everyone arrived");
    comm.barrier();
  });
}

TEST(GlooCommunicator, SingleRankIsLocal) {
  InProcessStore store;
  std::unique_ptr<Communicator> comm = make_gloo_communicator(store, 0, 1, fast_gloo_options());
  testing::check_all_collectives(*comm);
  EXPECT_EQ(store.get("gloo/world/0"), std::nullopt);  // no rendezvous needed
}

TEST(GlooCommunicator, BadArgumentsThrowBeforeSendingAndLeaveItUsable) {
  with_group(2, [](Communicator& comm) {
    std::vector<float> buffer(8);
    const std::vector<int64_t> wrong_size = {1, 1, 1};
    EXPECT_THROW(comm.alltoallv(buffer.data(), wrong_size, buffer.data(), {1, 1}),
                 std::invalid_argument);
    EXPECT_THROW(comm.alltoallv(buffer.data(), {1, -1}, buffer.data(), {1, 1}),
                 std::invalid_argument);
    // What a rank sends itself must be what it receives from itself.
    std::vector<int64_t> send = {1, 1}, recv = {1, 1};
    send[comm.rank()] = 2;
    EXPECT_THROW(comm.alltoallv(buffer.data(), send, buffer.data(), recv), std::invalid_argument);
    EXPECT_THROW(comm.alltoall_counts({1}), std::invalid_argument);
    EXPECT_THROW(comm.broadcast(2, buffer.data(), 1), std::invalid_argument);
    EXPECT_THROW(comm.broadcast(-1, buffer.data(), 1), std::invalid_argument);
    comm.barrier();
    testing::check_broadcast(comm);
  });
  InProcessStore store;
  EXPECT_THROW(make_gloo_communicator(store, 2, 2), std::invalid_argument);
  EXPECT_THROW(make_gloo_communicator(store, -1, 2), std::invalid_argument);
}

TEST(GlooCommunicator, PeerThatNeverJoinsTimesOutWithAClearMessage) {
  InProcessStore base;
  NamespacedStore store(base, test_job_id(), 0);
  const GlooOptions options = fast_gloo_options(milliseconds(1000));
  std::promise<void> rank0_done;
  std::shared_future<void> rank0_done_future = rank0_done.get_future().share();
  std::string timeout_message, refused_message, peer_message;
  long timeout_ms = -1, peer_ms = -1;

  std::vector<std::string> errors = run_ranks(2, [&](int rank) {
    std::unique_ptr<Communicator> comm = make_gloo_communicator(store, rank, 2, options);
    if (rank == 1) {
      // Connected, alive, but never enters the collective: the hang we must not have.
      rank0_done_future.wait();
      // Rank 0 tore down its connections when it failed, so this rank fails fast too.
      const auto start = Clock::now();
      try {
        comm->barrier();
      } catch (const CommError& e) {
        peer_message = e.what();
      }
      peer_ms = elapsed_ms(start);
      return;
    }
    std::vector<float> data(16, 1.0f);
    const auto start = Clock::now();
    try {
      comm->allreduce_sum(data.data(), data.size());
    } catch (const TimeoutError& e) {
      timeout_message = e.what();
    }
    timeout_ms = elapsed_ms(start);
    try {
      comm->barrier();
    } catch (const CommError& e) {
      refused_message = e.what();
    }
    rank0_done.set_value();
  });
  ASSERT_TRUE(errors.empty()) << ::testing::PrintToString(errors);

  EXPECT_GE(timeout_ms, 1000);
  EXPECT_LT(timeout_ms, 3000);
  EXPECT_TRUE(contains(timeout_message, "allreduce_sum")) << timeout_message;
  EXPECT_TRUE(contains(timeout_message, "rank 0 of 2")) << timeout_message;
  EXPECT_TRUE(contains(timeout_message, "timeout 1000 ms")) << timeout_message;
  EXPECT_TRUE(contains(timeout_message, "timed out")) << timeout_message;
  // Later calls are refused at once, naming the original failure.
  EXPECT_TRUE(contains(refused_message, "barrier")) << refused_message;
  EXPECT_TRUE(contains(refused_message, "broken")) << refused_message;
  EXPECT_TRUE(contains(refused_message, "allreduce_sum timed out")) << refused_message;
  EXPECT_FALSE(peer_message.empty());
  EXPECT_TRUE(contains(peer_message, "barrier on rank 1 of 2")) << peer_message;
  EXPECT_LT(peer_ms, 1000) << peer_message;
}

TEST(GlooCommunicator, RendezvousWithAMissingRankTimesOut) {
  InProcessStore base;
  NamespacedStore store(base, test_job_id(), 0);
  GlooOptions options = fast_gloo_options();
  options.rendezvous_timeout = milliseconds(500);
  const auto start = Clock::now();
  try {
    make_gloo_communicator(store, 0, 2, options);
    FAIL() << "rendezvous without rank 1 succeeded";
  } catch (const TimeoutError& e) {
    EXPECT_TRUE(contains(e.what(), "rendezvous of rank 0 of 2")) << e.what();
    EXPECT_TRUE(contains(e.what(), "gloo/world/1")) << e.what();
  }
  EXPECT_LT(elapsed_ms(start), 3000);
}

TEST(GlooCommunicator, GroupsInOneNamespaceAreIndependent) {
  InProcessStore base;
  NamespacedStore store(base, test_job_id(), 0);
  std::vector<std::string> errors = run_ranks(2, [&](int rank) {
    auto comm_a = make_gloo_communicator(store, rank, 2, options_for_group("a"));
    auto comm_b = make_gloo_communicator(store, rank, 2, options_for_group("b"));
    int64_t x = rank + 1;
    comm_a->allreduce_sum(&x, 1);
    comm_b->allreduce_sum(&x, 1);
    if (x != 6) throw std::runtime_error("sum through two groups is " + std::to_string(x));
  });
  EXPECT_TRUE(errors.empty()) << ::testing::PrintToString(errors);
  EXPECT_TRUE(base.get(rendezvous_namespace(test_job_id(), 0) + "gloo/a/0").has_value());
  EXPECT_TRUE(base.get(rendezvous_namespace(test_job_id(), 0) + "gloo/b/1").has_value());
}

}  // namespace
}  // namespace loopmoe::comm

namespace loopmoe::comm::internal {
namespace {

bool sigpipe_blocked() {
  sigset_t mask;
  pthread_sigmask(SIG_BLOCK, nullptr, &mask);
  return sigismember(&mask, SIGPIPE) == 1;
}

bool sigpipe_pending() {
  sigset_t pending;
  sigpending(&pending);
  return sigismember(&pending, SIGPIPE) == 1;
}

TEST(SigpipeGuard, WriteToAClosedSocketFailsInsteadOfKillingTheProcess) {
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
  ::close(fds[1]);
  ASSERT_FALSE(sigpipe_blocked());
  {
    SigpipeGuard guard;
    EXPECT_TRUE(sigpipe_blocked());
    const char byte = 'x';
    EXPECT_EQ(::write(fds[0], &byte, 1), -1);  // without the guard: SIGPIPE, test binary dies
    EXPECT_EQ(errno, EPIPE);
    EXPECT_TRUE(sigpipe_pending());
  }
  // The raised SIGPIPE was consumed, and the mask is as before.
  EXPECT_FALSE(sigpipe_pending());
  EXPECT_FALSE(sigpipe_blocked());
  ::close(fds[0]);
}

TEST(SigpipeGuard, LeavesAnAlreadyBlockedMaskAlone) {
  sigset_t pipe;
  sigemptyset(&pipe);
  sigaddset(&pipe, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe, nullptr);
  { SigpipeGuard guard; }
  EXPECT_TRUE(sigpipe_blocked());
  pthread_sigmask(SIG_UNBLOCK, &pipe, nullptr);
}

}  // namespace
}  // namespace loopmoe::comm::internal
