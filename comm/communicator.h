// Collectives over a fixed group of processes (ranks 0..size-1): what the distributed service's
// workers and expert shards use to exchange token rows (all-to-all) and reduce gradients and batch
// statistics (all-reduce). Backends: Gloo over TCP for CPU memory (gloo_communicator.h), NCCL for
// CUDA device memory (nccl_communicator.h). docs/COMM.md describes semantics and rendezvous.
//
// Rules every caller follows:
//  - Every rank calls the same collectives in the same order with matching arguments (counts,
//    root, n). A rank that does not arrive makes the others fail after the timeout.
//  - Not thread-safe: one thread drives a communicator at a time.
//  - Every operation is synchronous: when it returns, the output buffers hold the result and the
//    input buffers may be reused.
//  - Each operation has the timeout given at construction. A dead or absent peer turns into a
//    TimeoutError or CommError naming the operation, the rank and the timeout, never a hang.
//    After any such error the communicator is broken: every later call throws CommError at once.
//    Argument errors (wrong vector sizes, negative counts, bad root) throw std::invalid_argument
//    before anything is sent and leave the communicator usable.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace loopmoe::comm {

class Communicator {
 public:
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;
  virtual ~Communicator() = default;

  int rank() const { return rank_; }
  int size() const { return size_; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  // "gloo" or "nccl"; appears in error messages.
  virtual const char* backend() const = 0;

  // Exchanges variable-sized segments between all pairs of ranks. Counts are in elements.
  // `send` holds size() segments back to back in rank order; segment j (send_counts[j] elements)
  // goes to rank j. `recv` receives size() segments back to back in rank order; segment i
  // (recv_counts[i] elements) comes from rank i. recv_counts[i] must equal rank i's
  // send_counts[rank()] (exchange them first with alltoall_counts): a mismatch cannot be detected
  // locally and is undefined (Gloo aborts the process on a larger segment, in its I/O thread, and
  // leaves a smaller one's tail unwritten). Any count may be zero, including all of them; a
  // pointer whose total is zero may be null.
  void alltoallv(const float* send, const std::vector<int64_t>& send_counts, float* recv,
                 const std::vector<int64_t>& recv_counts);
  void alltoallv(const int64_t* send, const std::vector<int64_t>& send_counts, int64_t* recv,
                 const std::vector<int64_t>& recv_counts);

  // One int64 per peer: returns r with r[i] = rank i's send_counts[rank()]. Always host memory,
  // whatever the backend; this is how each rank learns its recv_counts for alltoallv.
  std::vector<int64_t> alltoall_counts(const std::vector<int64_t>& send_counts);

  // In place: data[0..n) becomes the element-wise sum over ranks. Every rank ends with the same
  // bits (tested for Gloo; expected of NCCL, whose algorithms end by copying each reduced chunk to
  // every rank, but not verified here).
  // n must match across ranks; n == 0 is a no-op.
  void allreduce_sum(float* data, size_t n);
  void allreduce_sum(double* data, size_t n);
  void allreduce_sum(int64_t* data, size_t n);

  // In place: data[0..n) on every rank becomes root's data[0..n).
  void broadcast(int root, float* data, size_t n);
  void broadcast(int root, double* data, size_t n);
  void broadcast(int root, int64_t* data, size_t n);

  // Returns once every rank has entered the barrier.
  void barrier();

 protected:
  enum class DataType { kFloat32, kFloat64, kInt64 };
  static size_t element_size(DataType type);

  Communicator(int rank, int size, std::chrono::milliseconds timeout);

  // Backends implement these; arguments are already validated and the public wrappers turn any
  // exception into CommError/TimeoutError with the operation, rank and timeout in its message.
  virtual void do_alltoallv(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                            const std::vector<int64_t>& recv_counts, DataType type) = 0;
  virtual void do_alltoall_counts(const int64_t* send, int64_t* recv) = 0;
  virtual void do_allreduce_sum(void* data, size_t n, DataType type) = 0;
  virtual void do_broadcast(int root, void* data, size_t n, DataType type) = 0;
  virtual void do_barrier() = 0;
  // Called once, after the first failure: tear down the transport so that peers blocked on us
  // fail fast instead of waiting out their own timeouts. Must not throw.
  virtual void abort_transport() noexcept = 0;

 private:
  void check_counts(const char* op, const std::vector<int64_t>& counts, const char* name) const;
  void check_alltoallv(const std::vector<int64_t>& send_counts,
                       const std::vector<int64_t>& recv_counts) const;
  void check_root(const char* op, int root) const;
  // Runs `body` as operation `op`: refuses if broken, and converts failures into CommError or
  // TimeoutError (then marks the communicator broken and calls abort_transport()).
  void run(const char* op, const std::function<void()>& body);

  const int rank_;
  const int size_;
  const std::chrono::milliseconds timeout_;
  std::string broken_by_;  // the message of the first failure; empty while healthy
};

}  // namespace loopmoe::comm
