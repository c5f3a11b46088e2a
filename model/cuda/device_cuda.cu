// The CUDA backend (model/cuda_backend.h) that model/cuda/ registers in every executable linking
// loopmoe_model_cuda: the ops.h methods forward to ops_cuda.h's functions, and the device-memory
// methods of model/buffer.h are the CUDA runtime's. Every failure becomes std::runtime_error naming
// the call and CUDA's error string. Host code only (no kernels), so it needs no GPU to compile, and
// available() is false, without throwing, on a machine with no driver or no device.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "model/buffer.h"
#include "model/cuda/ops_cuda.h"
#include "model/cuda_backend.h"

namespace loopmoe::model::ops::cuda {
namespace {
void check(cudaError_t error, const char* call, size_t bytes) {
  if (error == cudaSuccess) return;
  throw std::runtime_error(std::string("Buffer: ") + call + " (" + std::to_string(bytes) +
                           " bytes) failed: " + cudaGetErrorString(error));
}

// Bytes held by live allocations, for the peak the trainer reports. A map per allocation: cheap
// next to cudaMalloc itself.
struct Usage {
  std::mutex mutex;
  struct Block {
    size_t bytes;
    bool pooled;  // from cudaMallocAsync (freed with cudaFreeAsync), else cudaMalloc
  };
  std::unordered_map<void*, Block> blocks;
  size_t current = 0, peak = 0;
};
Usage& usage() {
  static Usage* u = new Usage;  // never destroyed: buffers may outlive static destructors
  return *u;
}

// Device memory is stream-ordered: cudaMallocAsync and cudaFreeAsync on the default stream, from
// the device's default memory pool with its release threshold raised so that freed blocks stay in
// the pool. cudaFree waits for the whole device, and the model frees temporaries in every layer (a
// Buffer going out of scope: the dispatcher's expert outputs, the router's gradients, ...), so with
// plain cudaMalloc/cudaFree each of them would be a host wait for the GPU to drain. A block freed
// this way is handed out again only to work queued after the free on the same stream, which is all
// our work (cuda_util.cuh: one stream). A device without memory pools gets cudaMalloc/cudaFree.
struct Pools {
  std::mutex mutex;
  std::unordered_map<int, bool> ready;  // device → uses its pool (set up on first allocation)
};
Pools& pools() {
  static Pools* p = new Pools;  // never destroyed, like Usage
  return *p;
}
// Whether the current device allocates from its pool; the first call per device raises the
// pool's release threshold (by default the pool returns freed memory at every synchronisation).
bool use_pool(int& device, size_t bytes) {
  // Named after the allocation they serve, which is what failed for the caller.
  check(cudaGetDevice(&device), "cudaMalloc: cudaGetDevice", bytes);
  Pools& p = pools();
  std::lock_guard<std::mutex> lock(p.mutex);
  auto it = p.ready.find(device);
  if (it != p.ready.end()) return it->second;
  int supported = 0;
  check(cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, device),
        "cudaMalloc: cudaDeviceGetAttribute(cudaDevAttrMemoryPoolsSupported)", bytes);
  if (supported != 0) {
    cudaMemPool_t pool = nullptr;
    check(cudaDeviceGetDefaultMemPool(&pool, device), "cudaMalloc: cudaDeviceGetDefaultMemPool",
          bytes);
    uint64_t threshold = UINT64_MAX;
    check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold),
          "cudaMalloc: cudaMemPoolSetAttribute(cudaMemPoolAttrReleaseThreshold)", bytes);
  }
  p.ready[device] = supported != 0;
  return supported != 0;
}

void* device_alloc(size_t bytes) {
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  int device = 0;
  const bool pooled = use_pool(device, bytes);
  if (pooled) {
    cudaError_t error = cudaMallocAsync(&p, bytes, cudaStreamLegacy);
    if (error == cudaErrorMemoryAllocation) {
      // The pool may hold freed blocks of other sizes: wait until they are free on the device,
      // give them back, and try once more.
      static_cast<void>(cudaGetLastError());
      check(cudaStreamSynchronize(cudaStreamLegacy), "cudaStreamSynchronize", bytes);
      cudaMemPool_t pool = nullptr;
      check(cudaDeviceGetDefaultMemPool(&pool, device), "cudaDeviceGetDefaultMemPool", bytes);
      check(cudaMemPoolTrimTo(pool, 0), "cudaMemPoolTrimTo", bytes);
      error = cudaMallocAsync(&p, bytes, cudaStreamLegacy);
    }
    check(error, "cudaMallocAsync", bytes);
  } else {
    check(cudaMalloc(&p, bytes), "cudaMalloc", bytes);
  }
  Usage& u = usage();
  std::lock_guard<std::mutex> lock(u.mutex);
  u.blocks[p] = Usage::Block{bytes, pooled};
  u.current += bytes;
  u.peak = std::max(u.peak, u.current);
  return p;
}

void device_free(void* p) noexcept {
  if (p == nullptr) return;
  bool pooled = false;
  {
    Usage& u = usage();
    std::lock_guard<std::mutex> lock(u.mutex);
    auto it = u.blocks.find(p);
    if (it != u.blocks.end()) {
      u.current -= it->second.bytes;
      pooled = it->second.pooled;
      u.blocks.erase(it);
    }
  }
  // Nothing to report from a destructor; a failure here means the context is already gone.
  static_cast<void>(pooled ? cudaFreeAsync(p, cudaStreamLegacy) : cudaFree(p));
}

size_t device_peak_bytes() {
  Usage& u = usage();
  std::lock_guard<std::mutex> lock(u.mutex);
  return u.peak;
}

void device_select(int ordinal) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    static_cast<void>(cudaGetLastError());
    count = 0;
  }
  if (ordinal < 0 || ordinal >= count) {
    throw std::runtime_error("no CUDA device " + std::to_string(ordinal) + " (this machine has " +
                             std::to_string(count) + ")");
  }
  check(cudaSetDevice(ordinal), "cudaSetDevice", 0);
}

void device_zero(void* p, size_t bytes) {
  if (bytes == 0) return;
  check(cudaMemset(p, 0, bytes), "cudaMemset", bytes);
}

void device_copy_to_host(void* host, const void* device, size_t bytes) {
  if (bytes == 0) return;
  check(cudaMemcpy(host, device, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy device to host",
        bytes);
}

void device_copy_from_host(void* device, const void* host, size_t bytes) {
  if (bytes == 0) return;
  check(cudaMemcpy(device, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy host to device",
        bytes);
}

void device_copy(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  check(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice), "cudaMemcpy device to device",
        bytes);
}

bool device_available() {
  // Asked once. Without a driver or a device cudaGetDeviceCount returns an error code (it does
  // not throw); cudaGetLastError then clears that (non-sticky) error so it does not resurface
  // as the "last error" of an unrelated later call.
  static const bool available = [] {
    int count = 0;
    const cudaError_t error = cudaGetDeviceCount(&count);
    if (error != cudaSuccess) {
      static_cast<void>(cudaGetLastError());
      return false;
    }
    return count > 0;
  }();
  return available;
}

class Backend final : public CudaBackend {
 public:
#define LOOPMOE_CUDA_BACKEND_OP(ret, name, params, args, device_pointers) \
  ret name params override { return ::loopmoe::model::ops::cuda::name args; }
  LOOPMOE_OPS(LOOPMOE_CUDA_BACKEND_OP, float)
  LOOPMOE_OPS_FLOAT(LOOPMOE_CUDA_BACKEND_OP)
#undef LOOPMOE_CUDA_BACKEND_OP

  void* allocate(size_t bytes) override { return device_alloc(bytes); }
  void deallocate(void* p) noexcept override { device_free(p); }
  void zero(void* p, size_t bytes) override { device_zero(p, bytes); }
  void copy_to_host(void* host, const void* device, size_t bytes) override {
    device_copy_to_host(host, device, bytes);
  }
  void copy_from_host(void* device, const void* host, size_t bytes) override {
    device_copy_from_host(device, host, bytes);
  }
  void copy(void* dst, const void* src, size_t bytes) override { device_copy(dst, src, bytes); }
  bool available() override { return device_available(); }
  void select(int ordinal) override { device_select(ordinal); }
  size_t peak_bytes() override { return device_peak_bytes(); }
  void synchronize() override {
    const cudaError_t error = cudaDeviceSynchronize();
    if (error != cudaSuccess) {
      throw std::runtime_error(std::string("cudaDeviceSynchronize failed: ") +
                               cudaGetErrorString(error));
    }
  }
};

// Registers the backend before main runs: this file is in every executable that links
// loopmoe_model_cuda (an object library, so nothing of it is left out). Never destroyed, like the
// allocations it tracks.
struct Registrar {
  Registrar() { register_cuda_backend(new Backend); }
} registrar;

}  // namespace
}  // namespace loopmoe::model::ops::cuda
