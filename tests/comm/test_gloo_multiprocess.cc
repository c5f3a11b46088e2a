// The Gloo communicator across separate processes: this test binary spawns copies of itself in
// child mode (see comm_test_main.cc), which rendezvous through a FileStore directory.
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "comm/comm_error.h"
#include "comm/file_store.h"
#include "comm/gloo_communicator.h"
#include "tests/comm/comm_test_util.h"

extern char** environ;

namespace loopmoe::comm::testing {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

constexpr const char* kJobId = "multiprocess";

std::unique_ptr<Communicator> join(const std::string& store_dir, int rank, int size) {
  FileStore files(store_dir);
  NamespacedStore store(files, kJobId, 0);
  return make_gloo_communicator(store, rank, size, fast_gloo_options());
}

pid_t spawn_child(const std::string& scenario, const std::string& store_dir, int rank, int size) {
  const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  std::vector<std::string> args = {self,      "--comm-child",       scenario,
                                   store_dir, std::to_string(rank), std::to_string(size)};
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  const int error = ::posix_spawn(&pid, self.c_str(), nullptr, nullptr, argv.data(), environ);
  if (error != 0) throw std::runtime_error("posix_spawn failed: " + std::to_string(error));
  return pid;
}

// Waits for `pid` up to `limit`; kills it after that. Returns its exit code, or -1 if it was
// killed or died of a signal.
int wait_child(pid_t pid, std::chrono::milliseconds limit) {
  const auto deadline = Clock::now() + limit;
  while (true) {
    int status = 0;
    const pid_t done = ::waitpid(pid, &status, WNOHANG);
    if (done == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    if (Clock::now() >= deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(milliseconds(10));
  }
}

}  // namespace

int run_child(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: --comm-child SCENARIO STORE_DIR RANK SIZE\n");
    return 64;
  }
  const std::string scenario = argv[2];
  const std::string store_dir = argv[3];
  const int rank = std::stoi(argv[4]);
  const int size = std::stoi(argv[5]);
  try {
    std::unique_ptr<Communicator> comm = join(store_dir, rank, size);
    if (scenario == "collectives") {
      check_all_collectives(*comm);
      return 0;
    }
    if (scenario == "barrier_then_die") {
      comm->barrier();
      // Like a crash: no destructors, no goodbye; the kernel closes the sockets.
      ::_exit(0);
    }
    std::fprintf(stderr, "unknown scenario %s\n", scenario.c_str());
    return 64;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "child rank %d: %s\n", rank, e.what());
    return 1;
  }
}

namespace {

TEST(GlooMultiProcess, CollectivesAcrossThreeProcesses) {
  TempDir dir;
  std::vector<pid_t> children;
  for (int rank = 0; rank < 3; ++rank) {
    children.push_back(spawn_child("collectives", dir.path().string(), rank, 3));
  }
  for (int rank = 0; rank < 3; ++rank) {
    EXPECT_EQ(wait_child(children[rank], std::chrono::seconds(20)), 0) << "rank " << rank;
  }
}

TEST(GlooMultiProcess, DeadPeerProcessFailsFastInsteadOfHanging) {
  TempDir dir;
  const pid_t child = spawn_child("barrier_then_die", dir.path().string(), 1, 2);
  std::unique_ptr<Communicator> comm = join(dir.path().string(), 0, 2);
  comm->barrier();
  ASSERT_EQ(wait_child(child, std::chrono::seconds(10)), 0);  // rank 1 is gone now

  // Broadcast from this rank only writes, to a socket whose peer is gone: without care that
  // raises SIGPIPE, which would kill this test binary rather than fail the operation.
  std::vector<float> data(1 << 20, 1.0f);
  const auto start = Clock::now();
  std::string message;
  try {
    comm->broadcast(0, data.data(), data.size());
  } catch (const CommError& e) {
    message = e.what();
  }
  const auto ms = std::chrono::duration_cast<milliseconds>(Clock::now() - start).count();
  ASSERT_FALSE(message.empty()) << "broadcast to a dead peer did not fail";
  EXPECT_NE(message.find("broadcast on rank 0 of 2"), std::string::npos) << message;
  EXPECT_NE(message.find("timeout 2000 ms"), std::string::npos) << message;
  EXPECT_LT(ms, 2000 + 1000) << message;
}

}  // namespace
}  // namespace loopmoe::comm::testing
