// The CUDA backend as the engine (loopmoe_model) sees it: an interface that model/cuda/ implements
// and registers when an executable links it (loopmoe_model_cuda). The ops.h dispatcher
// (ops_dispatch.cc) sends Device::kCuda calls to it, and buffer.h's device-memory functions
// (cuda_backend.cc) go through it; without one they throw "no CUDA backend".
//
// Why a registered backend instead of a link-time dependency of loopmoe_model: only the executables
// that train on a GPU may load the CUDA runtime. libcudart's thread-local storage (4 KB, 4 KB
// aligned) is static TLS, carved out of every thread's stack; with OpenBLAS's 60 KB already there,
// the 100 KB stacks civetweb gives the threads of the Prometheus metrics server (`--metrics-listen`
// of loopmoe-worker and loopmoe-expert-shard) no longer hold a request, and the server crashed on a
// scrape (a stack overflow in civetweb's printf; tests/service_e2e.sh). So the top-level
// CMakeLists.txt links loopmoe_model_cuda into loopmoe and loopmoe_bench, and tests/cuda into
// loopmoe_cuda_tests; the service executables run on the CPU (docs/ARCHITECTURE.md) and never load
// CUDA. cuBLAS, whose cuBLASLt has 94 KB of TLS, is loaded with dlopen even there
// (model/cuda/cublas_loader.h).
#pragma once

#include <cstddef>

#include "model/ops_list.h"

namespace loopmoe::model::ops {

class CudaBackend {
 public:
  virtual ~CudaBackend() = default;

  // ops.h on the device: one method per entry of model/ops_list.h, its parameters with T = float
  // (the backend is float only), implemented by model/cuda/ops_cuda.h's function of that name.
#define LOOPMOE_CUDA_BACKEND_OP(ret, name, params, args, device_pointers) \
  virtual ret name params = 0;
  LOOPMOE_OPS(LOOPMOE_CUDA_BACKEND_OP, float)
  LOOPMOE_OPS_FLOAT(LOOPMOE_CUDA_BACKEND_OP)
#undef LOOPMOE_CUDA_BACKEND_OP

  // The device functions of model/buffer.h (namespace detail), whose contracts are written there:
  // device_alloc, device_free, device_zero, device_copy_to_host, device_copy_from_host,
  // device_copy, device_available, device_select, device_peak_bytes.
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* p) noexcept = 0;
  virtual void zero(void* p, size_t bytes) = 0;
  virtual void copy_to_host(void* host, const void* device, size_t bytes) = 0;
  virtual void copy_from_host(void* device, const void* host, size_t bytes) = 0;
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;
  virtual bool available() = 0;
  virtual void select(int ordinal) = 0;
  virtual size_t peak_bytes() = 0;
  // Waits for everything queued on the device (cudaDeviceSynchronize): the op profile's clock.
  virtual void synchronize() = 0;
};

// The backend linked into this executable, or nullptr.
CudaBackend* cuda_backend();
// Called by model/cuda/ during static initialization (before main), once; the backend lives until
// the process ends.
void register_cuda_backend(CudaBackend* backend);

}  // namespace loopmoe::model::ops
