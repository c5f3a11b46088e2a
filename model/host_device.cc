// The test-only emulated device of model/buffer.h (Device::kHostAsDevice): host memory that
// Buffer treats as device memory, and a registry of its live allocations, which the ops.h
// dispatcher (ops_dispatch.cc) checks every device-pointer argument against. A host array handed
// to a kernel (a std::vector, a parameter mirror) is then an error here, as it would be a fault
// on a GPU.
#include <cstdint>
#include <map>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>

#include "model/buffer.h"

namespace loopmoe::model::detail {
namespace {
struct Registry {
  std::mutex mutex;
  std::map<uintptr_t, size_t> blocks;  // start address -> bytes
};
Registry& registry() {
  static Registry* r = new Registry;  // never destroyed: buffers may outlive static destructors
  return *r;
}
}  // namespace

void* host_as_device_alloc(size_t bytes) {
  if (bytes == 0) return nullptr;
  // operator new, as std::vector's allocator: the same alignment as a host buffer's storage.
  void* p = ::operator new(bytes);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.blocks[reinterpret_cast<uintptr_t>(p)] = bytes;
  return p;
}

void host_as_device_free(void* p) noexcept {
  if (p == nullptr) return;
  {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    r.blocks.erase(reinterpret_cast<uintptr_t>(p));
  }
  ::operator delete(p);
}

void check_host_as_device_pointer(const void* p, const char* op) {
  if (p == nullptr) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.blocks.upper_bound(a);
  if (it != r.blocks.begin()) {
    --it;
    if (a <= it->first + it->second) return;  // inside, or one past the end (an empty range)
  }
  throw std::logic_error(std::string("ops::") + op +
                         ": a device-memory argument is not device memory (on the emulated "
                         "device: not in any kHostAsDevice Buffer); a host array was passed to a "
                         "kernel");
}

}  // namespace loopmoe::model::detail
