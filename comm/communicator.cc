#include "comm/communicator.h"

#include <stdexcept>

#include "comm/comm_error.h"

namespace loopmoe::comm {
namespace {

std::string where(const char* backend, const char* op, int rank, int size) {
  return std::string("comm(") + backend + "): " + op + " on rank " + std::to_string(rank) + " of " +
         std::to_string(size);
}

}  // namespace

Communicator::Communicator(int rank, int size, std::chrono::milliseconds timeout)
    : rank_(rank), size_(size), timeout_(timeout) {
  if (size < 1 || rank < 0 || rank >= size) {
    throw std::invalid_argument("comm: rank " + std::to_string(rank) + " is not in [0, " +
                                std::to_string(size) + ")");
  }
  if (timeout.count() <= 0) throw std::invalid_argument("comm: timeout must be positive");
}

size_t Communicator::element_size(DataType type) {
  switch (type) {
    case DataType::kFloat32:
      return sizeof(float);
    case DataType::kFloat64:
      return sizeof(double);
    case DataType::kInt64:
      return sizeof(int64_t);
  }
  return 0;
}

void Communicator::check_counts(const char* op, const std::vector<int64_t>& counts,
                                const char* name) const {
  if (counts.size() != static_cast<size_t>(size_)) {
    throw std::invalid_argument(where(backend(), op, rank_, size_) + ": " + name + " has " +
                                std::to_string(counts.size()) + " entries, expected one per rank");
  }
  for (size_t i = 0; i < counts.size(); ++i) {
    if (counts[i] < 0) {
      throw std::invalid_argument(where(backend(), op, rank_, size_) + ": " + name + "[" +
                                  std::to_string(i) + "] = " + std::to_string(counts[i]) +
                                  " is negative");
    }
  }
}

void Communicator::check_alltoallv(const std::vector<int64_t>& send_counts,
                                   const std::vector<int64_t>& recv_counts) const {
  check_counts("alltoallv", send_counts, "send_counts");
  check_counts("alltoallv", recv_counts, "recv_counts");
  // The only mismatch a rank can see locally: what it sends itself must be what it receives.
  if (send_counts[rank_] != recv_counts[rank_]) {
    throw std::invalid_argument(
        where(backend(), "alltoallv", rank_, size_) + ": send_counts[rank] != recv_counts[rank] (" +
        std::to_string(send_counts[rank_]) + " != " + std::to_string(recv_counts[rank_]) + ")");
  }
}

void Communicator::check_root(const char* op, int root) const {
  if (root < 0 || root >= size_) {
    throw std::invalid_argument(where(backend(), op, rank_, size_) + ": root " +
                                std::to_string(root) + " is not a rank");
  }
}

void Communicator::run(const char* op, const std::function<void()>& body) {
  if (!broken_by_.empty()) {
    throw CommError(where(backend(), op, rank_, size_) +
                    ": refused, the communicator is broken by an earlier failure (" + broken_by_ +
                    "); create a new one");
  }
  const auto start = std::chrono::steady_clock::now();
  std::string cause;
  try {
    body();
    return;
  } catch (const std::exception& e) {
    cause = e.what();
  } catch (...) {
    cause = "unknown exception";
  }
  const auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::steady_clock::now() - start);
  // Backends report a passed deadline in their own words (Gloo: "Timed out waiting ..."); having
  // spent the whole timeout is the backend-independent sign that a peer never arrived.
  const bool timed_out = elapsed >= timeout_;
  std::string message = where(backend(), op, rank_, size_) +
                        (timed_out ? " timed out" : " failed") + " after " +
                        std::to_string(elapsed.count()) + " ms (timeout " +
                        std::to_string(timeout_.count()) + " ms): " + cause;
  if (timed_out) {
    message += " -- a peer is dead, hung, or not calling the same collective";
  }
  broken_by_ = std::string(op) + (timed_out ? " timed out" : " failed");
  abort_transport();
  if (timed_out) throw TimeoutError(message);
  throw CommError(message);
}

void Communicator::alltoallv(const float* send, const std::vector<int64_t>& send_counts,
                             float* recv, const std::vector<int64_t>& recv_counts) {
  check_alltoallv(send_counts, recv_counts);
  run("alltoallv", [&] { do_alltoallv(send, send_counts, recv, recv_counts, DataType::kFloat32); });
}

void Communicator::alltoallv(const int64_t* send, const std::vector<int64_t>& send_counts,
                             int64_t* recv, const std::vector<int64_t>& recv_counts) {
  check_alltoallv(send_counts, recv_counts);
  run("alltoallv", [&] { do_alltoallv(send, send_counts, recv, recv_counts, DataType::kInt64); });
}

std::vector<int64_t> Communicator::alltoall_counts(const std::vector<int64_t>& send_counts) {
  check_counts("alltoall_counts", send_counts, "send_counts");
  std::vector<int64_t> recv_counts(size_, 0);
  run("alltoall_counts", [&] { do_alltoall_counts(send_counts.data(), recv_counts.data()); });
  return recv_counts;
}

void Communicator::allreduce_sum(float* data, size_t n) {
  if (n == 0) return;
  run("allreduce_sum", [&] { do_allreduce_sum(data, n, DataType::kFloat32); });
}

void Communicator::allreduce_sum(double* data, size_t n) {
  if (n == 0) return;
  run("allreduce_sum", [&] { do_allreduce_sum(data, n, DataType::kFloat64); });
}

void Communicator::allreduce_sum(int64_t* data, size_t n) {
  if (n == 0) return;
  run("allreduce_sum", [&] { do_allreduce_sum(data, n, DataType::kInt64); });
}

void Communicator::broadcast(int root, float* data, size_t n) {
  check_root("broadcast", root);
  if (n == 0) return;
  run("broadcast", [&] { do_broadcast(root, data, n, DataType::kFloat32); });
}

void Communicator::broadcast(int root, double* data, size_t n) {
  check_root("broadcast", root);
  if (n == 0) return;
  run("broadcast", [&] { do_broadcast(root, data, n, DataType::kFloat64); });
}

void Communicator::broadcast(int root, int64_t* data, size_t n) {
  check_root("broadcast", root);
  if (n == 0) return;
  run("broadcast", [&] { do_broadcast(root, data, n, DataType::kInt64); });
}

void Communicator::barrier() {
  run("barrier", [&] { do_barrier(); });
}

}  // namespace loopmoe::comm
