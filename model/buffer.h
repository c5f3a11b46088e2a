// Buffer<T>: the array type of the model's activations and kernel temporaries, whose storage is
// host memory (Device::kCpu) or device memory (Device::kCuda). The model-level code (model.cc,
// iter_adaln, router, moe_layer, experts, dispatchers) allocates through it and hands data() to
// the kernels of ops.h, so a device backend (model/cuda/) allocates the same buffers on the GPU
// without changes there. Data leave a buffer for the host only through copy_to_host (or, on the
// CPU, the host views below).
//
// This build is CPU only: host storage is a std::vector<T>; the device storage is declared and
// goes through the raw functions in `detail` (model/cpu/device_none.cc defines them to throw, a
// CUDA build defines them in model/cuda/), so constructing a kCuda buffer throws a clear error.
//
// Parameters, gradients and AdamW moments are not Buffers: they stay one contiguous
// ZeroPageVector each (zero_page_allocator.h), because checkpoints, the gradient groups and the
// distributed runtime address them by flat offset. A device backend would keep the host
// ZeroPageVector as the master copy for checkpoints and mirror it in one device allocation of
// the same length (same offsets, so ParamLayout and the replica ranges carry over), synchronised
// explicitly at load/save and around the optimiser step.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

namespace loopmoe::model {

enum class Device { kCpu, kCuda };

inline const char* to_string(Device device) { return device == Device::kCpu ? "cpu" : "cuda"; }

namespace detail {
// Raw device memory for Buffer<T> (bytes). Defined by the backend: model/cpu/device_none.cc
// throws std::runtime_error from each (no device in this build); model/cuda/ will wrap
// cudaMalloc, cudaFree, cudaMemset and cudaMemcpy.
void* device_alloc(size_t bytes);
void device_free(void* p) noexcept;
void device_zero(void* p, size_t bytes);
void device_copy_to_host(void* host, const void* device, size_t bytes);
void device_copy_from_host(void* device, const void* host, size_t bytes);
void device_copy(void* dst, const void* src, size_t bytes);  // device to device
// Whether this build has a device backend.
bool device_available();
}  // namespace detail

// The device a Buffer is allocated on when its constructor names none: kCpu unless a backend
// with a device changes it. set_default_device(Device::kCuda) throws in a build without one.
inline std::atomic<Device>& default_device_slot() {
  static std::atomic<Device> device{Device::kCpu};
  return device;
}
inline Device default_device() { return default_device_slot().load(std::memory_order_relaxed); }
inline void set_default_device(Device device) {
  if (device == Device::kCuda && !detail::device_available()) {
    throw std::runtime_error(
        "set_default_device: this build of LoopMoE has no CUDA backend (model/cuda/)");
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
      detail::device_copy(dev_, other.dev_, bytes(size_));
    }
  }
  Buffer(Buffer&& other) noexcept : device_(Device::kCpu) { swap(other); }
  ~Buffer() { release_device(); }
  // A copy on this buffer's device (host to host reuses the capacity, as std::vector does).
  Buffer& operator=(const Buffer& other) {
    if (this == &other) return *this;
    if (device_ == Device::kCpu && other.device_ == Device::kCpu) {
      host_ = other.host_;
    } else if (device_ == Device::kCuda && other.device_ == Device::kCuda) {
      if (size_ != other.size_) {
        release_device();
        allocate_device(other.size_);
      }
      detail::device_copy(dev_, other.dev_, bytes(size_));
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
    Buffer grown(n, Device::kCuda);
    detail::device_copy(grown.dev_, dev_, bytes(std::min(n, size_)));
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
      detail::device_zero(dev_, bytes(size_));
    }
  }
  void clear() { resize(0); }

  // Host access: valid on a host buffer only (unchecked, like std::vector's operator[]).
  T& operator[](size_t i) { return host_[i]; }
  const T& operator[](size_t i) const { return host_[i]; }
  T* begin() { return host_.data(); }
  T* end() { return host_.data() + host_.size(); }
  const T* begin() const { return host_.data(); }
  const T* end() const { return host_.data() + host_.size(); }
  // The host storage itself, for callers that take a std::vector (no copy); throws on a device
  // buffer, whose data must go through copy_to_host.
  const std::vector<T>& host_vector() const {
    if (device_ != Device::kCpu) {
      throw std::logic_error("Buffer::host_vector: the data are on the device; use copy_to_host");
    }
    return host_;
  }

 private:
  static size_t bytes(size_t n) { return n * sizeof(T); }
  void allocate_device(size_t n) {
    dev_ = static_cast<T*>(detail::device_alloc(bytes(n)));
    size_ = n;
    detail::device_zero(dev_, bytes(n));
  }
  void release_device() noexcept {
    if (dev_ != nullptr) detail::device_free(dev_);
    dev_ = nullptr;
    size_ = 0;
  }

  Device device_;
  std::vector<T> host_;  // kCpu storage
  T* dev_ = nullptr;     // kCuda storage: size_ elements
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
    detail::device_copy_to_host(dst, src.data() + offset, count * sizeof(T));
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
  if (n > 0) detail::device_copy_from_host(dst.data(), src, n * sizeof(T));
}

}  // namespace loopmoe::model
