#include "comm/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>
#include <stdexcept>
#include <thread>

#include "comm/comm_error.h"
#include "comm/nccl_unique_id.h"

// Non-blocking communicators (ncclConfig_t.blocking = 0), which the timeouts rely on.
#if NCCL_VERSION_CODE < NCCL_VERSION(2, 14, 0)
#error "NcclCommunicator needs NCCL >= 2.14"
#endif

namespace loopmoe::comm {
namespace {

static_assert(NCCL_UNIQUE_ID_BYTES == kNcclUniqueIdBytes);

using Clock = std::chrono::steady_clock;

// How often a wait looks at the stream and the communicator. Short, because collectives on small
// messages finish in microseconds; a sleep (not a spin) so a hung peer costs no CPU.
constexpr auto kPollInterval = std::chrono::microseconds(50);

void check_cuda(cudaError_t result, const char* what) {
  if (result != cudaSuccess) {
    throw CommError(std::string(what) + ": " + cudaGetErrorString(result));
  }
}

// In a non-blocking communicator any call may return ncclInProgress: the work was accepted and
// completes asynchronously (Nccl::complete waits for it).
void check_nccl(ncclResult_t result, const char* what) {
  if (result != ncclSuccess && result != ncclInProgress) {
    throw CommError(std::string(what) + ": " + ncclGetErrorString(result));
  }
}

}  // namespace

bool cuda_device_available() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    // No driver or no device: clear the runtime's last-error state so it does not surface later.
    (void)cudaGetLastError();
    return false;
  }
  return count > 0;
}

std::string create_nccl_unique_id() {
  ncclUniqueId id;
  const ncclResult_t result = ncclGetUniqueId(&id);
  if (result != ncclSuccess) {
    throw CommError(std::string("ncclGetUniqueId: ") + ncclGetErrorString(result));
  }
  return std::string(id.internal, NCCL_UNIQUE_ID_BYTES);
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(KeyValueStore& store, int rank, int size, const NcclOptions& options)
      : Communicator(rank, size, options.timeout) {
    if (options.rendezvous_timeout.count() <= 0) {
      throw std::invalid_argument("comm(nccl): rendezvous_timeout must be positive");
    }
    if (!cuda_device_available()) {
      throw CommError("comm(nccl): rank " + std::to_string(rank) + " of " + std::to_string(size) +
                      ": no CUDA device available");
    }
    try {
      int devices = 0;
      check_cuda(cudaGetDeviceCount(&devices), "cudaGetDeviceCount");
      device_ = options.device >= 0 ? options.device : rank % devices;
      check_cuda(cudaSetDevice(device_), "cudaSetDevice");

      const std::string id_bytes = exchange_nccl_unique_id(
          store, rank, options.group, options.rendezvous_timeout, create_nccl_unique_id);
      ncclUniqueId id;
      std::memcpy(id.internal, id_bytes.data(), NCCL_UNIQUE_ID_BYTES);

      check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
      // An 8-byte slot holding barrier()'s float, then send and receive counts for
      // alltoall_counts() (kept 8-byte aligned).
      check_cuda(cudaMalloc(&scratch_, (1 + 2 * static_cast<size_t>(size)) * sizeof(int64_t)),
                 "cudaMalloc");

      ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
      config.blocking = 0;  // so that a missing rank is a timeout here, not a hang inside NCCL
      check_nccl(ncclCommInitRankConfig(&comm_, size, id, rank, &config), "ncclCommInitRankConfig");
      wait_for_comm(Clock::now() + options.rendezvous_timeout, "ncclCommInitRankConfig");
    } catch (const std::exception& e) {
      release(/*abort=*/true);
      const std::string message =
          "comm(nccl): initialisation of rank " + std::to_string(rank) + " of " +
          std::to_string(size) + " (device " + std::to_string(device_) + ", key '" +
          nccl_unique_id_key(options.group) + "', timeout " +
          std::to_string(options.rendezvous_timeout.count()) + " ms) failed: " + e.what();
      if (dynamic_cast<const TimeoutError*>(&e)) throw TimeoutError(message);
      throw CommError(message);
    }
  }

  ~NcclCommunicator() override { release(/*abort=*/false); }

  const char* backend() const override { return "nccl"; }

 protected:
  void do_alltoallv(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                    const std::vector<int64_t>& recv_counts, DataType type) override {
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    const size_t bytes = element_size(type);
    const ncclDataType_t nccl_type = to_nccl(type);
    const auto* send_bytes = static_cast<const char*>(send);
    auto* recv_bytes = static_cast<char*>(recv);
    std::vector<size_t> send_offsets(size(), 0), recv_offsets(size(), 0);
    for (int i = 1; i < size(); ++i) {
      send_offsets[i] = send_offsets[i - 1] + static_cast<size_t>(send_counts[i - 1]);
      recv_offsets[i] = recv_offsets[i - 1] + static_cast<size_t>(recv_counts[i - 1]);
    }
    // The own segment is a device-to-device copy rather than a send to self.
    if (send_counts[rank()] > 0) {
      check_cuda(cudaMemcpyAsync(recv_bytes + recv_offsets[rank()] * bytes,
                                 send_bytes + send_offsets[rank()] * bytes,
                                 static_cast<size_t>(send_counts[rank()]) * bytes,
                                 cudaMemcpyDeviceToDevice, stream_),
                 "cudaMemcpyAsync");
    }
    // Zero counts are skipped on both sides alike (rank j's recv_counts[i] is rank i's
    // send_counts[j]), so every posted send has its matching receive.
    check_nccl(ncclGroupStart(), "ncclGroupStart");
    for (int peer = 0; peer < size(); ++peer) {
      if (peer == rank()) continue;
      if (send_counts[peer] > 0) {
        check_nccl(
            ncclSend(send_bytes + send_offsets[peer] * bytes,
                     static_cast<size_t>(send_counts[peer]), nccl_type, peer, comm_, stream_),
            "ncclSend");
      }
      if (recv_counts[peer] > 0) {
        check_nccl(
            ncclRecv(recv_bytes + recv_offsets[peer] * bytes,
                     static_cast<size_t>(recv_counts[peer]), nccl_type, peer, comm_, stream_),
            "ncclRecv");
      }
    }
    check_nccl(ncclGroupEnd(), "ncclGroupEnd");
    complete("alltoallv");
  }

  void do_alltoall_counts(const int64_t* send, int64_t* recv) override {
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    int64_t* send_device = counts_scratch();
    int64_t* recv_device = send_device + size();
    const size_t bytes = size() * sizeof(int64_t);
    check_cuda(cudaMemcpyAsync(send_device, send, bytes, cudaMemcpyHostToDevice, stream_),
               "cudaMemcpyAsync");
    const std::vector<int64_t> ones(size(), 1);
    do_alltoallv(send_device, ones, recv_device, ones, DataType::kInt64);
    // The stream is idle now (do_alltoallv completed it), so this copy cannot hang on a peer.
    check_cuda(cudaMemcpyAsync(recv, recv_device, bytes, cudaMemcpyDeviceToHost, stream_),
               "cudaMemcpyAsync");
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

  void do_allreduce_sum(void* data, size_t n, DataType type) override {
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    check_nccl(ncclAllReduce(data, data, n, to_nccl(type), ncclSum, comm_, stream_),
               "ncclAllReduce");
    complete("allreduce_sum");
  }

  void do_broadcast(int root, void* data, size_t n, DataType type) override {
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    check_nccl(ncclBroadcast(data, data, n, to_nccl(type), root, comm_, stream_), "ncclBroadcast");
    complete("broadcast");
  }

  // NCCL has no barrier; a one-element all-reduce cannot finish before every rank has joined.
  void do_barrier() override {
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    check_nccl(ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, stream_),
               "ncclAllReduce");
    complete("barrier");
  }

  // ncclCommAbort stops this rank's kernels and closes its connections, so peers blocked on it
  // fail rather than wait; it is also the only safe way out of a communicator with work stuck.
  void abort_transport() noexcept override {
    if (comm_ == nullptr) return;
    (void)ncclCommAbort(comm_);
    comm_ = nullptr;
  }

 private:
  static ncclDataType_t to_nccl(DataType type) {
    switch (type) {
      case DataType::kFloat32:
        return ncclFloat32;
      case DataType::kFloat64:
        return ncclFloat64;
      case DataType::kInt64:
        return ncclInt64;
    }
    return ncclFloat32;
  }

  int64_t* counts_scratch() const {
    return reinterpret_cast<int64_t*>(static_cast<char*>(scratch_) + sizeof(int64_t));
  }

  // Polls until the communicator has no operation in progress (non-blocking init, group end).
  void wait_for_comm(Clock::time_point deadline, const char* what) {
    while (true) {
      ncclResult_t state = ncclSuccess;
      check_nccl(ncclCommGetAsyncError(comm_, &state), "ncclCommGetAsyncError");
      if (state == ncclSuccess) return;
      if (state != ncclInProgress) throw async_error(state, what);
      if (Clock::now() >= deadline) {
        throw TimeoutError(std::string(what) + " still in progress at the deadline");
      }
      std::this_thread::sleep_for(kPollInterval);
    }
  }

  // Waits for the operation just enqueued: first for NCCL to accept it, then for the stream to
  // drain, watching for asynchronous NCCL errors (a peer's connection failing) all along.
  void complete(const char* what) {
    const auto deadline = Clock::now() + timeout();
    wait_for_comm(deadline, what);
    while (true) {
      const cudaError_t result = cudaStreamQuery(stream_);
      if (result == cudaSuccess) return;
      if (result != cudaErrorNotReady) check_cuda(result, "cudaStreamQuery");
      ncclResult_t state = ncclSuccess;
      check_nccl(ncclCommGetAsyncError(comm_, &state), "ncclCommGetAsyncError");
      if (state != ncclSuccess && state != ncclInProgress) throw async_error(state, what);
      if (Clock::now() >= deadline) {
        throw TimeoutError(std::string(what) + " did not complete on the GPU in time");
      }
      std::this_thread::sleep_for(kPollInterval);
    }
  }

  CommError async_error(ncclResult_t state, const char* what) const {
    return CommError(std::string(what) + ": " + ncclGetErrorString(state) + " (" +
                     ncclGetLastError(comm_) + ")");
  }

  // Frees everything this object holds. `abort` skips the orderly NCCL shutdown, which needs
  // every peer and would otherwise block on a dead one.
  void release(bool abort) noexcept {
    if (comm_ != nullptr) {
      bool finalized = false;
      const ncclResult_t result = abort ? ncclInvalidUsage : ncclCommFinalize(comm_);
      if (result == ncclSuccess || result == ncclInProgress) {
        try {
          wait_for_comm(Clock::now() + timeout(), "ncclCommFinalize");
          finalized = true;
        } catch (...) {
        }
      }
      (void)(finalized ? ncclCommDestroy(comm_) : ncclCommAbort(comm_));
      comm_ = nullptr;
    }
    if (scratch_ != nullptr) (void)cudaFree(scratch_);
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
    scratch_ = nullptr;
    stream_ = nullptr;
  }

  int device_ = -1;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  void* scratch_ = nullptr;
};

std::unique_ptr<Communicator> make_nccl_communicator(KeyValueStore& store, int rank, int size,
                                                     const NcclOptions& options) {
  return std::make_unique<NcclCommunicator>(store, rank, size, options);
}

}  // namespace loopmoe::comm
