// Shared helpers for the comm/ tests: temporary directories, running one function per rank on
// threads, and the collective scenarios that both the threaded and the multi-process tests run.
#pragma once

#include <chrono>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/gloo_communicator.h"

namespace loopmoe::comm::testing {

// A fresh directory, removed (with its contents) on destruction.
class TempDir {
 public:
  TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir();
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// A job id unique to the running test, so tests sharing a store never see each other's keys.
std::string test_job_id();

// Short timeouts so that a failing test fails in seconds, not minutes.
GlooOptions fast_gloo_options(std::chrono::milliseconds timeout = std::chrono::seconds(2));

// Runs fn(rank) on `size` threads and waits for all. Returns one message per rank that threw
// ("rank r: what()"); empty if all returned normally.
std::vector<std::string> run_ranks(int size, const std::function<void(int rank)>& fn);

// The elements rank `src` sends to rank `dst` in the uneven scenario: some pairs send nothing.
int64_t uneven_count(int src, int dst);
// The three-rank scenario with zero counts: rank 0 sends nothing, rank 2 receives nothing, and
// rank 1 sends to itself.
int64_t zero_heavy_count(int src, int dst);
// The value of element i of the segment src sends to dst; exact in float and distinct per element.
float segment_value(int src, int dst, int64_t i);

// Each throws std::runtime_error naming the first mismatch. All ranks of `comm` must call the same
// function. `count` is uneven_count or zero_heavy_count.
void check_alltoallv(Communicator& comm, int64_t (*count)(int src, int dst));
void check_alltoallv_int64(Communicator& comm);
void check_allreduce(Communicator& comm);
void check_broadcast(Communicator& comm);
// Everything above, in one sequence (what a child process of the multi-process test runs).
void check_all_collectives(Communicator& comm);

}  // namespace loopmoe::comm::testing
