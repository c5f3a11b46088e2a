// The NCCL communicator. This machine and CI have the CUDA toolkit and NCCL but no GPU, so the
// tests that need a device skip; what runs everywhere is the no-device behaviour and the unique-id
// exchange through a store.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "comm/comm_error.h"
#include "comm/in_process_store.h"
#include "comm/nccl_communicator.h"
#include "comm/nccl_unique_id.h"
#include "tests/comm/comm_test_util.h"

namespace loopmoe::comm {
namespace {

using std::chrono::milliseconds;

void check_cuda(cudaError_t result) {
  if (result != cudaSuccess) throw std::runtime_error(cudaGetErrorString(result));
}

// A device copy of a host vector, freed on destruction.
template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(const std::vector<T>& host) : size_(host.size()) {
    check_cuda(cudaMalloc(&ptr_, std::max<size_t>(size_, 1) * sizeof(T)));
    check_cuda(cudaMemcpy(ptr_, host.data(), size_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~DeviceBuffer() { (void)cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() { return ptr_; }
  std::vector<T> to_host() const {
    std::vector<T> host(size_);
    check_cuda(cudaMemcpy(host.data(), ptr_, size_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  T* ptr_ = nullptr;
  size_t size_;
};

TEST(NcclCommunicator, CudaDeviceAvailableAnswersWithoutCrashing) {
  const bool available = cuda_device_available();
  EXPECT_EQ(available, cuda_device_available());  // and answers the same twice
  RecordProperty("cuda_device_available", available ? "true" : "false");
}

TEST(NcclCommunicator, WithoutADeviceConstructionThrowsCommError) {
  if (cuda_device_available()) GTEST_SKIP() << "a CUDA device is present";
  InProcessStore store;
  try {
    make_nccl_communicator(store, 0, 1);
    FAIL() << "constructed an NCCL communicator without a device";
  } catch (const CommError& e) {
    EXPECT_NE(std::string(e.what()).find("no CUDA device"), std::string::npos) << e.what();
  }
  // It failed before touching the store: no half-published id for others to pick up.
  EXPECT_EQ(store.get(nccl_unique_id_key("world")), std::nullopt);
}

TEST(NcclCommunicator, UniqueIdPublishedAndLookedUpThroughTheStore) {
  // ncclGetUniqueId needs no GPU, but it does need a network interface NCCL accepts.
  std::string probe;
  try {
    probe = create_nccl_unique_id();
  } catch (const CommError& e) {
    GTEST_SKIP() << "ncclGetUniqueId unavailable here: " << e.what();
  }
  ASSERT_EQ(probe.size(), kNcclUniqueIdBytes);

  InProcessStore base;
  NamespacedStore store(base, testing::test_job_id(), 2);
  std::vector<std::string> ids(3);
  std::vector<std::string> errors = testing::run_ranks(3, [&](int rank) {
    ids[rank] =
        exchange_nccl_unique_id(store, rank, "world", milliseconds(5000), create_nccl_unique_id);
  });
  ASSERT_TRUE(errors.empty()) << ::testing::PrintToString(errors);
  EXPECT_EQ(ids[0].size(), kNcclUniqueIdBytes);
  EXPECT_EQ(ids[1], ids[0]);
  EXPECT_EQ(ids[2], ids[0]);
  EXPECT_NE(ids[0], std::string(kNcclUniqueIdBytes, '\0'));
  EXPECT_EQ(base.get("job/" + testing::test_job_id() + "/epoch/2/nccl/world/unique_id"), ids[0]);
}

TEST(NcclCommunicator, CollectivesOnDeviceMemory) {
  if (!cuda_device_available()) GTEST_SKIP() << "no CUDA device";
  int devices = 0;
  ASSERT_EQ(cudaGetDeviceCount(&devices), cudaSuccess);
  // NCCL allows one rank per GPU in a communicator.
  const int size = std::min(devices, 3);
  InProcessStore base;
  NamespacedStore store(base, testing::test_job_id(), 0);
  std::vector<std::string> errors = testing::run_ranks(size, [&](int rank) {
    NcclOptions options;
    options.device = rank;
    options.timeout = milliseconds(10000);
    options.rendezvous_timeout = milliseconds(30000);
    std::unique_ptr<Communicator> comm = make_nccl_communicator(store, rank, size, options);
    check_cuda(cudaSetDevice(rank));

    // alltoallv with uneven (and some zero) counts.
    std::vector<int64_t> send_counts(size);
    for (int dst = 0; dst < size; ++dst) send_counts[dst] = testing::uneven_count(rank, dst);
    const std::vector<int64_t> recv_counts = comm->alltoall_counts(send_counts);
    std::vector<float> send;
    for (int dst = 0; dst < size; ++dst) {
      for (int64_t i = 0; i < send_counts[dst]; ++i) {
        send.push_back(testing::segment_value(rank, dst, i));
      }
    }
    int64_t recv_total = 0;
    for (int src = 0; src < size; ++src) {
      if (recv_counts[src] != testing::uneven_count(src, rank)) {
        throw std::runtime_error("alltoall_counts mismatch");
      }
      recv_total += recv_counts[src];
    }
    DeviceBuffer<float> send_device(send);
    DeviceBuffer<float> recv_device(std::vector<float>(recv_total, -1.0f));
    comm->alltoallv(send_device.get(), send_counts, recv_device.get(), recv_counts);
    const std::vector<float> recv = recv_device.to_host();
    size_t at = 0;
    for (int src = 0; src < size; ++src) {
      for (int64_t i = 0; i < recv_counts[src]; ++i, ++at) {
        if (recv[at] != testing::segment_value(src, rank, i)) {
          throw std::runtime_error("alltoallv mismatch");
        }
      }
    }

    DeviceBuffer<float> sum(std::vector<float>(1000, static_cast<float>(rank + 1)));
    comm->allreduce_sum(sum.get(), 1000);
    for (float v : sum.to_host()) {
      if (v != size * (size + 1) / 2.0f) throw std::runtime_error("allreduce mismatch");
    }

    DeviceBuffer<int64_t> data(std::vector<int64_t>(10, rank == 0 ? 42 : -1));
    comm->broadcast(0, data.get(), 10);
    for (int64_t v : data.to_host()) {
      if (v != 42) throw std::runtime_error("broadcast mismatch");
    }
    comm->barrier();
  });
  EXPECT_TRUE(errors.empty()) << ::testing::PrintToString(errors);
}

}  // namespace
}  // namespace loopmoe::comm
