// The device-memory functions of model/buffer.h for a build without a device backend: each
// throws, so constructing a Device::kCuda Buffer fails with a clear message. A CUDA build
// compiles model/cuda/ instead of this file.
#include <stdexcept>
#include <string>

#include "model/buffer.h"

namespace loopmoe::model::detail {
namespace {
[[noreturn]] void no_device(const char* what) {
  throw std::runtime_error(std::string("Buffer: ") + what +
                           " needs Device::kCuda storage, but this build of LoopMoE has no CUDA "
                           "backend (model/cuda/); use Device::kCpu");
}
}  // namespace

void* device_alloc(size_t) { no_device("device_alloc"); }
void device_free(void*) noexcept {}
void device_zero(void*, size_t) { no_device("device_zero"); }
void device_copy_to_host(void*, const void*, size_t) { no_device("device_copy_to_host"); }
void device_copy_from_host(void*, const void*, size_t) { no_device("device_copy_from_host"); }
void device_copy(void*, const void*, size_t) { no_device("device_copy"); }
bool device_available() { return false; }
void device_select(int) { no_device("device_select"); }
size_t device_peak_bytes() { return 0; }

}  // namespace loopmoe::model::detail
