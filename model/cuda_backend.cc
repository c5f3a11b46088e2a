// The CUDA backend's registry (cuda_backend.h), and model/buffer.h's device-memory functions on
// top of it: each forwards to the registered backend, or throws naming what is missing, so that
// constructing a Device::kCuda Buffer in an executable without the backend fails clearly.
#include "model/cuda_backend.h"

#include <stdexcept>
#include <string>

#include "model/buffer.h"

namespace loopmoe::model {
namespace ops {
namespace {

// Written once, during static initialization (register_cuda_backend), and only read afterwards.
CudaBackend*& backend_slot() {
  static CudaBackend* backend = nullptr;
  return backend;
}

}  // namespace

CudaBackend* cuda_backend() { return backend_slot(); }

void register_cuda_backend(CudaBackend* backend) { backend_slot() = backend; }

}  // namespace ops

namespace detail {
using ops::cuda_backend;
using ops::CudaBackend;
namespace {
CudaBackend& backend_for(const char* what) {
  CudaBackend* backend = cuda_backend();
  if (backend == nullptr) {
    throw std::runtime_error(std::string("Buffer: ") + what +
                             " needs Device::kCuda storage, but this executable has no CUDA "
                             "backend (model/cuda/: built with LOOPMOE_CUDA, linked into loopmoe, "
                             "loopmoe_bench and the CUDA tests); use Device::kCpu");
  }
  return *backend;
}
}  // namespace

void* device_alloc(size_t bytes) { return backend_for("device_alloc").allocate(bytes); }
void device_free(void* p) noexcept {
  // Only a pointer from device_alloc gets here, so a backend is there (nothing to free otherwise).
  if (CudaBackend* backend = cuda_backend()) backend->deallocate(p);
}
void device_zero(void* p, size_t bytes) { backend_for("device_zero").zero(p, bytes); }
void device_copy_to_host(void* host, const void* device, size_t bytes) {
  backend_for("device_copy_to_host").copy_to_host(host, device, bytes);
}
void device_copy_from_host(void* device, const void* host, size_t bytes) {
  backend_for("device_copy_from_host").copy_from_host(device, host, bytes);
}
void device_copy(void* dst, const void* src, size_t bytes) {
  backend_for("device_copy").copy(dst, src, bytes);
}
bool device_available() {
  CudaBackend* backend = cuda_backend();
  return backend != nullptr && backend->available();
}
bool device_backend_linked() { return cuda_backend() != nullptr; }
void device_select(int ordinal) { backend_for("device_select").select(ordinal); }
size_t device_peak_bytes() {
  CudaBackend* backend = cuda_backend();
  return backend != nullptr ? backend->peak_bytes() : 0;
}

}  // namespace detail
}  // namespace loopmoe::model
