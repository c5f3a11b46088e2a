#include "tests/comm/comm_test_util.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <thread>

namespace loopmoe::comm::testing {
namespace {

namespace fs = std::filesystem;

[[noreturn]] void mismatch(const Communicator& comm, const std::string& what) {
  throw std::runtime_error("rank " + std::to_string(comm.rank()) + ": " + what);
}

// Element i of a broadcast payload from `root`: exact in every type used.
double broadcast_value(int root, size_t i) { return 1000.0 * (root + 1) + static_cast<double>(i); }

template <typename T>
void check_broadcast_of(Communicator& comm, int root, size_t n) {
  std::vector<T> data(n, static_cast<T>(-1));
  if (comm.rank() == root) {
    for (size_t i = 0; i < n; ++i) data[i] = static_cast<T>(broadcast_value(root, i));
  }
  comm.broadcast(root, data.data(), n);
  for (size_t i = 0; i < n; ++i) {
    if (data[i] != static_cast<T>(broadcast_value(root, i))) {
      mismatch(comm, "broadcast from root " + std::to_string(root) + ": element " +
                         std::to_string(i) + " is " + std::to_string(data[i]));
    }
  }
}

}  // namespace

TempDir::TempDir() {
  static std::atomic<int> counter{0};
  path_ = fs::temp_directory_path() / ("loopmoe_comm_test_" + std::to_string(::getpid()) + "_" +
                                       std::to_string(counter.fetch_add(1)));
  fs::remove_all(path_);
  fs::create_directories(path_);
}

TempDir::~TempDir() {
  std::error_code ignored;
  fs::remove_all(path_, ignored);
}

std::string test_job_id() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string id = info ? std::string(info->test_suite_name()) + "." + info->name() : "job";
  for (char& c : id) {
    if (c == '/') c = '_';  // parameterised test names contain '/', which a job id may not
  }
  return id;
}

GlooOptions fast_gloo_options(std::chrono::milliseconds timeout) {
  GlooOptions options;
  options.timeout = timeout;
  options.rendezvous_timeout = std::chrono::seconds(10);
  return options;
}

std::vector<std::string> run_ranks(int size, const std::function<void(int rank)>& fn) {
  std::vector<std::string> errors(size);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < size; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        fn(rank);
      } catch (const std::exception& e) {
        errors[rank] = "rank " + std::to_string(rank) + ": " + e.what();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  std::vector<std::string> failed;
  for (std::string& error : errors) {
    if (!error.empty()) failed.push_back(std::move(error));
  }
  return failed;
}

// Rows of 128 floats, 0 to 290 rows per pair.
int64_t uneven_count(int src, int dst) { return (src * 7 + dst * 13 + 5) % 11 * 29 * 128; }

int64_t zero_heavy_count(int src, int dst) {
  static constexpr int64_t kCounts[3][3] = {{0, 0, 0}, {3, 2, 0}, {5, 1, 0}};
  return kCounts[src][dst];
}

float segment_value(int src, int dst, int64_t i) {
  return static_cast<float>(src * 1000000 + dst * 100000 + i);
}

void check_alltoallv(Communicator& comm, int64_t (*count)(int src, int dst)) {
  const int rank = comm.rank();
  const int size = comm.size();
  std::vector<int64_t> send_counts(size);
  for (int dst = 0; dst < size; ++dst) send_counts[dst] = count(rank, dst);

  const std::vector<int64_t> recv_counts = comm.alltoall_counts(send_counts);
  for (int src = 0; src < size; ++src) {
    if (recv_counts[src] != count(src, rank)) {
      mismatch(comm, "alltoall_counts: from rank " + std::to_string(src) + " got " +
                         std::to_string(recv_counts[src]) + ", expected " +
                         std::to_string(count(src, rank)));
    }
  }

  std::vector<float> send;
  for (int dst = 0; dst < size; ++dst) {
    for (int64_t i = 0; i < send_counts[dst]; ++i) send.push_back(segment_value(rank, dst, i));
  }
  int64_t recv_total = 0;
  for (int64_t c : recv_counts) recv_total += c;
  // NaN-filled so that an element nobody wrote cannot pass for a right one.
  std::vector<float> recv(recv_total, std::nanf(""));
  comm.alltoallv(send.empty() ? nullptr : send.data(), send_counts,
                 recv.empty() ? nullptr : recv.data(), recv_counts);

  size_t at = 0;
  for (int src = 0; src < size; ++src) {
    for (int64_t i = 0; i < recv_counts[src]; ++i, ++at) {
      if (recv[at] != segment_value(src, rank, i)) {
        mismatch(comm, "alltoallv: element " + std::to_string(i) + " from rank " +
                           std::to_string(src) + " is " + std::to_string(recv[at]));
      }
    }
  }
}

void check_alltoallv_int64(Communicator& comm) {
  const int rank = comm.rank();
  const int size = comm.size();
  // Values above 2^53 would not survive a detour through double: the path must be bit-exact.
  auto value = [](int src, int dst, int64_t i) -> int64_t {
    return (int64_t{src + 1} << 56) + (int64_t{dst} << 40) + i;
  };
  std::vector<int64_t> send_counts(size), recv_counts(size);
  std::vector<int64_t> send;
  for (int dst = 0; dst < size; ++dst) {
    send_counts[dst] = (rank + dst) % 3;  // includes zeros for size >= 2
    for (int64_t i = 0; i < send_counts[dst]; ++i) send.push_back(value(rank, dst, i));
  }
  for (int src = 0; src < size; ++src) recv_counts[src] = (src + rank) % 3;
  std::vector<int64_t> recv(6 * size, -1);
  comm.alltoallv(send.data(), send_counts, recv.data(), recv_counts);
  size_t at = 0;
  for (int src = 0; src < size; ++src) {
    for (int64_t i = 0; i < recv_counts[src]; ++i, ++at) {
      if (recv[at] != value(src, rank, i)) {
        mismatch(comm, "alltoallv<int64>: element " + std::to_string(i) + " from rank " +
                           std::to_string(src) + " is " + std::to_string(recv[at]));
      }
    }
  }
}

void check_allreduce(Communicator& comm) {
  const int rank = comm.rank();
  const int size = comm.size();
  const double rank_sum = size * (size - 1) / 2.0;

  // Exact sums in float, over more than one of Gloo's 1 MiB segments.
  const size_t n = 300000;
  std::vector<float> f(n);
  for (size_t i = 0; i < n; ++i) f[i] = static_cast<float>(rank) + 0.25f * (i % 64);
  comm.allreduce_sum(f.data(), n);
  for (size_t i = 0; i < n; ++i) {
    const float expected = static_cast<float>(rank_sum + size * 0.25 * (i % 64));
    if (f[i] != expected) {
      mismatch(comm, "allreduce_sum<float>: element " + std::to_string(i) + " is " +
                         std::to_string(f[i]) + ", expected " + std::to_string(expected));
    }
  }

  std::vector<double> d(1000);
  for (size_t i = 0; i < d.size(); ++i) d[i] = rank * 1e10 + static_cast<double>(i);
  comm.allreduce_sum(d.data(), d.size());
  for (size_t i = 0; i < d.size(); ++i) {
    if (d[i] != rank_sum * 1e10 + size * static_cast<double>(i)) {
      mismatch(comm, "allreduce_sum<double>: element " + std::to_string(i) + " is wrong");
    }
  }

  std::vector<int64_t> l(100);
  for (size_t i = 0; i < l.size(); ++i) l[i] = (int64_t{rank} << 40) + static_cast<int64_t>(i);
  comm.allreduce_sum(l.data(), l.size());
  for (size_t i = 0; i < l.size(); ++i) {
    const int64_t expected =
        (static_cast<int64_t>(rank_sum) << 40) + size * static_cast<int64_t>(i);
    if (l[i] != expected) {
      mismatch(comm, "allreduce_sum<int64>: element " + std::to_string(i) + " is wrong");
    }
  }

  // Inexact sums: whatever rounding happens, every rank must end with the same bits (the design
  // relies on it for batch statistics). Compare against rank 0's result.
  std::vector<float> g(5000);
  for (size_t i = 0; i < g.size(); ++i) g[i] = std::sin(rank * 1000.0f + i) * 1e3f;
  comm.allreduce_sum(g.data(), g.size());
  std::vector<float> reference = g;
  comm.broadcast(0, reference.data(), reference.size());
  if (std::memcmp(g.data(), reference.data(), g.size() * sizeof(float)) != 0) {
    mismatch(comm, "allreduce_sum<float>: result bits differ from rank 0's");
  }

  comm.allreduce_sum(static_cast<float*>(nullptr), 0);  // n == 0 is a no-op
}

void check_broadcast(Communicator& comm) {
  for (int root : {comm.size() - 1, 0}) {
    check_broadcast_of<float>(comm, root, 1000);
    check_broadcast_of<double>(comm, root, 10);
    check_broadcast_of<int64_t>(comm, root, 10);
  }
}

void check_all_collectives(Communicator& comm) {
  if (comm.size() == 3) check_alltoallv(comm, zero_heavy_count);
  check_alltoallv(comm, uneven_count);
  check_alltoallv_int64(comm);
  check_allreduce(comm);
  check_broadcast(comm);
  comm.barrier();
}

}  // namespace loopmoe::comm::testing
