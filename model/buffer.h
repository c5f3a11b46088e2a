// Buffer<T>: the array type of the model's activations and kernel temporaries, whose storage is
// host memory (Device::kCpu), device memory (Device::kCuda) or the test-only emulated device
// (Device::kHostAsDevice). The model-level code (model.cc, iter_adaln, router, moe_layer,
// experts, dispatchers) allocates through it and hands data() to the kernels of ops.h, which run
// on the default device's backend (model/ops_dispatch.cc). Data leave a device buffer for the
// host only through copy_to_host; the host views (operator[], begin/end, host_vector) are for
// kCpu buffers and throw std::logic_error on any other.
//
// Host storage is a std::vector<T>; device storage goes through the raw functions in `detail`:
// model/cuda_backend.cc (the CUDA runtime through the linked backend, model/cuda/device_cuda.cu;
// each throws without one), and model/host_device.cc for the emulated device.
//
// Parameters, gradients and AdamW moments are FlatBuffers (flat_buffer.h): the ZeroPageVector
// they always were on the CPU, a Buffer of the same length (same offsets) on a device.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace loopmoe::model {

// kHostAsDevice: a test-only emulated device (tests/test_host_device.cc). Its buffers are host
// memory that Buffer treats exactly as device memory (no operator[], begin(), host_vector(); data
// leave only through copy_to_host), and its kernels are the CPU's, which the ops.h dispatcher
// (model/ops_dispatch.cc) runs after checking that every device pointer lies in one of its
// buffers. Training on it must give the CPU's bits: that proves, without a GPU, that the model
// reaches device memory from the host only through explicit copies.
enum class Device { kCpu, kCuda, kHostAsDevice };

inline const char* to_string(Device device) {
  switch (device) {
    case Device::kCpu:
      return "cpu";
    case Device::kCuda:
      return "cuda";
    case Device::kHostAsDevice:
      return "host-as-device";
  }
  return "?";
}

namespace detail {
// Raw device memory for Buffer<T> (bytes). Defined in model/cuda_backend.cc: each forwards to the
// CUDA backend linked into the executable (model/cuda/device_cuda.cu: cudaMalloc, cudaFree,
// cudaMemset, cudaMemcpy), or throws std::runtime_error without one.
void* device_alloc(size_t bytes);
void device_free(void* p) noexcept;
void device_zero(void* p, size_t bytes);
void device_copy_to_host(void* host, const void* device, size_t bytes);
void device_copy_from_host(void* device, const void* host, size_t bytes);
void device_copy(void* dst, const void* src, size_t bytes);  // device to device
// Whether a CUDA device can be used: false without a CUDA backend, and false without throwing
// where the backend is linked but the machine has no GPU or no driver.
bool device_available();
// Whether this executable links the CUDA backend (model/cuda_backend.h: loopmoe, loopmoe_bench and
// the CUDA tests of a build with LOOPMOE_CUDA), whether or not the machine has a GPU.
bool device_backend_linked();
// Makes CUDA device `ordinal` the current one (cudaSetDevice); throws std::runtime_error when
// there is no such device (or no backend). Before any allocation.
void device_select(int ordinal);
// The most bytes of device memory Buffers held at once so far (0 without a backend).
size_t device_peak_bytes();

// The emulated device's memory (model/host_device.cc): host allocations recorded in a registry,
// so that the dispatcher can check a kernel's pointer arguments against it.
void* host_as_device_alloc(size_t bytes);
void host_as_device_free(void* p) noexcept;
// Throws std::logic_error naming `op` unless p is nullptr or points into (or one past the end
// of) a live emulated allocation.
void check_host_as_device_pointer(const void* p, const char* op);

// Raw memory of a non-host device.
inline void* alloc_on(Device device, size_t bytes) {
  return device == Device::kCuda ? device_alloc(bytes) : host_as_device_alloc(bytes);
}
inline void free_on(Device device, void* p) noexcept {
  if (device == Device::kCuda) {
    device_free(p);
  } else {
    host_as_device_free(p);
  }
}
inline void zero_on(Device device, void* p, size_t bytes) {
  if (device == Device::kCuda) {
    device_zero(p, bytes);
  } else if (bytes > 0) {
    std::memset(p, 0, bytes);
  }
}
inline void copy_to_host_from(Device device, void* host, const void* src, size_t bytes) {
  if (device == Device::kCuda) {
    device_copy_to_host(host, src, bytes);
  } else if (bytes > 0) {
    std::memcpy(host, src, bytes);
  }
}
inline void copy_from_host_to(Device device, void* dst, const void* host, size_t bytes) {
  if (device == Device::kCuda) {
    device_copy_from_host(dst, host, bytes);
  } else if (bytes > 0) {
    std::memcpy(dst, host, bytes);
  }
}
inline void copy_on(Device device, void* dst, const void* src, size_t bytes) {
  if (device == Device::kCuda) {
    device_copy(dst, src, bytes);
  } else if (bytes > 0) {
    std::memcpy(dst, src, bytes);
  }
}
[[noreturn]] inline void host_access_on_device(const char* what) {
  throw std::logic_error(std::string("Buffer::") + what +
                         ": the data are on the device; use copy_to_host");
}
}  // namespace detail

// The device a Buffer is allocated on when its constructor names none, and whose kernels the
// ops.h functions run: kCpu unless set. set_default_device(Device::kCuda) throws in an
// executable without the CUDA backend or on a machine without a device. A Model stays on the device
// it was built on (model.h).
inline std::atomic<Device>& default_device_slot() {
  static std::atomic<Device> device{Device::kCpu};
  return device;
}
inline Device default_device() { return default_device_slot().load(std::memory_order_relaxed); }
inline void set_default_device(Device device) {
  if (device == Device::kCuda && !detail::device_available()) {
    throw std::runtime_error(
        "set_default_device: no CUDA device (this executable has no CUDA backend, or the machine "
        "has no usable GPU)");
  }
  default_device_slot().store(device, std::memory_order_relaxed);
}

template <typename T>
class Buffer {
  static_assert(std::is_trivially_copyable_v<T>, "Buffer holds plain numbers");

 public:
  using value_type = T;

  Buffer() : device_(default_device()) {}
  // n zeros on `device`.
  explicit Buffer(size_t n, Device device = default_device()) : device_(device) {
    if (device_ == Device::kCpu) {
      host_.resize(n);
    } else {
      allocate_device(n);
    }
  }
  // n copies of value, on the host.
  Buffer(size_t n, T value) : device_(Device::kCpu), host_(n, value) {}

  Buffer(const Buffer& other) : device_(other.device_) {
    if (device_ == Device::kCpu) {
      host_ = other.host_;
    } else {
      allocate_device(other.size_);
      detail::copy_on(device_, dev_, other.dev_, bytes(size_));
    }
  }
  Buffer(Buffer&& other) noexcept : device_(Device::kCpu) { swap(other); }
  ~Buffer() { release_device(); }
  // A copy on this buffer's device (host to host reuses the capacity, as std::vector does).
  Buffer& operator=(const Buffer& other) {
    if (this == &other) return *this;
    if (device_ == Device::kCpu && other.device_ == Device::kCpu) {
      host_ = other.host_;
    } else if (device_ == other.device_) {
      if (size_ != other.size_) {
        release_device();
        allocate_device(other.size_);
      }
      detail::copy_on(device_, dev_, other.dev_, bytes(size_));
    } else {
      Buffer copy(other);
      swap(copy);
    }
    return *this;
  }
  Buffer& operator=(Buffer&& other) noexcept {
    Buffer moved(std::move(other));
    swap(moved);
    return *this;
  }
  void swap(Buffer& other) noexcept {
    std::swap(device_, other.device_);
    host_.swap(other.host_);
    std::swap(dev_, other.dev_);
    std::swap(size_, other.size_);
  }

  Device device() const { return device_; }
  bool on_host() const { return device_ == Device::kCpu; }
  size_t size() const { return device_ == Device::kCpu ? host_.size() : size_; }
  bool empty() const { return size() == 0; }
  // The storage on this buffer's device (what kernels take).
  T* data() { return device_ == Device::kCpu ? host_.data() : dev_; }
  const T* data() const { return device_ == Device::kCpu ? host_.data() : dev_; }

  // n elements: the first min(size, n) kept, new ones zero.
  void resize(size_t n) {
    if (device_ == Device::kCpu) {
      host_.resize(n);
      return;
    }
    if (n == size_) return;
    Buffer grown(n, device_);
    detail::copy_on(device_, grown.dev_, dev_, bytes(std::min(n, size_)));
    swap(grown);
  }
  // n copies of value (a device buffer takes zero only).
  void assign(size_t n, T value) {
    if (device_ == Device::kCpu) {
      host_.assign(n, value);
      return;
    }
    if (value != T(0)) throw std::logic_error("Buffer::assign: a device buffer can only be zeroed");
    resize(n);
    set_zero();
  }
  void set_zero() {
    if (device_ == Device::kCpu) {
      std::fill(host_.begin(), host_.end(), T(0));
    } else {
      detail::zero_on(device_, dev_, bytes(size_));
    }
  }
  void clear() { resize(0); }

  // Host access: valid on a host buffer only; throws std::logic_error on a device buffer (real
  // or emulated), whose data must go through copy_to_host. The index itself is unchecked, like
  // std::vector's operator[]; the device check is one compare.
  T& operator[](size_t i) {
    if (device_ != Device::kCpu) [[unlikely]]
      detail::host_access_on_device("operator[]");
    return host_[i];
  }
  const T& operator[](size_t i) const {
    if (device_ != Device::kCpu) [[unlikely]]
      detail::host_access_on_device("operator[]");
    return host_[i];
  }
  T* begin() { return host_view("begin"); }
  T* end() { return host_view("end") + host_.size(); }
  const T* begin() const { return host_view("begin"); }
  const T* end() const { return host_view("end") + host_.size(); }
  // The host storage itself, for callers that take a std::vector (no copy).
  const std::vector<T>& host_vector() const {
    if (device_ != Device::kCpu) detail::host_access_on_device("host_vector");
    return host_;
  }

 private:
  static size_t bytes(size_t n) { return n * sizeof(T); }
  T* host_view(const char* what) {
    if (device_ != Device::kCpu) [[unlikely]]
      detail::host_access_on_device(what);
    return host_.data();
  }
  const T* host_view(const char* what) const {
    if (device_ != Device::kCpu) [[unlikely]]
      detail::host_access_on_device(what);
    return host_.data();
  }
  void allocate_device(size_t n) {
    dev_ = static_cast<T*>(detail::alloc_on(device_, bytes(n)));
    size_ = n;
    detail::zero_on(device_, dev_, bytes(n));
  }
  void release_device() noexcept {
    if (dev_ != nullptr) detail::free_on(device_, dev_);
    dev_ = nullptr;
    size_ = 0;
  }

  Device device_;
  std::vector<T> host_;  // kCpu storage
  T* dev_ = nullptr;     // kCuda or kHostAsDevice storage: size_ elements
  size_t size_ = 0;
};

// count elements from src[offset...] into host memory dst.
template <typename T>
void copy_to_host(T* dst, const Buffer<T>& src, size_t offset, size_t count) {
  if (offset + count > src.size()) throw std::out_of_range("copy_to_host: past the buffer's end");
  if (count == 0) return;
  if (src.on_host()) {
    std::memcpy(dst, src.data() + offset, count * sizeof(T));
  } else {
    detail::copy_to_host_from(src.device(), dst, src.data() + offset, count * sizeof(T));
  }
}
// The whole buffer as a host vector (a copy, wherever the buffer lives).
template <typename T>
std::vector<T> copy_to_host(const Buffer<T>& src) {
  std::vector<T> out(src.size());
  copy_to_host(out.data(), src, 0, src.size());
  return out;
}
// dst (on its device) = n values of host memory src; dst is resized to n.
template <typename T>
void copy_from_host(Buffer<T>& dst, const T* src, size_t n) {
  if (dst.on_host()) {
    dst.resize(n);
    if (n > 0) std::memcpy(dst.data(), src, n * sizeof(T));
    return;
  }
  dst.resize(n);
  if (n > 0) detail::copy_from_host_to(dst.device(), dst.data(), src, n * sizeof(T));
}

}  // namespace loopmoe::model
