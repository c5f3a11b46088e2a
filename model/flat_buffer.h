// FlatBuffer: one flat float array in parameter-layout order (parameters, gradients, AdamW
// moments, the gradient groups) on the device its model lives on. On the CPU it is the
// ZeroPageVector those arrays always were (pages never written stay uncommitted, which a worker
// of the distributed service relies on for the experts' ranges); on a device (CUDA, or the
// emulated kHostAsDevice) it is a Buffer of the same length, so every offset of ParamLayout and
// the replica ranges carry over. The host reaches a device array only through the copies below.
#pragma once

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "model/buffer.h"
#include "model/zero_page_allocator.h"

namespace loopmoe::model {

class FlatBuffer {
 public:
  explicit FlatBuffer(Device device = default_device()) : device_(device), dev_(0, device) {}
  FlatBuffer(size_t n, Device device) : device_(device), dev_(0, device) {
    if (device_ == Device::kCpu) {
      host_.resize(n);
    } else {
      dev_.resize(n);
    }
  }

  Device device() const { return device_; }
  size_t size() const { return device_ == Device::kCpu ? host_.size() : dev_.size(); }
  // The storage on this array's device (what kernels take).
  float* data() { return device_ == Device::kCpu ? host_.data() : dev_.data(); }
  const float* data() const { return device_ == Device::kCpu ? host_.data() : dev_.data(); }

  // Zeros in [offset, offset + count).
  void zero(size_t offset, size_t count) {
    if (device_ == Device::kCpu) {
      std::fill_n(host_.data() + offset, count, 0.f);
    } else {
      detail::zero_on(device_, dev_.data() + offset, count * sizeof(float));
    }
  }
  void zero_all() {
    if (device_ == Device::kCpu) {
      std::memset(host_.data(), 0, host_.size() * sizeof(float));
    } else {
      dev_.set_zero();
    }
  }
  // count host values into [offset, offset + count).
  void copy_from_host(size_t offset, const float* src, size_t count) {
    if (offset + count > size()) throw std::out_of_range("FlatBuffer: copy past the end");
    if (device_ == Device::kCpu) {
      std::copy_n(src, count, host_.data() + offset);
    } else {
      detail::copy_from_host_to(device_, dev_.data() + offset, src, count * sizeof(float));
    }
  }
  // [offset, offset + count) into host memory dst.
  void copy_to_host(float* dst, size_t offset, size_t count) const {
    if (device_ == Device::kCpu) {
      if (offset + count > size()) throw std::out_of_range("FlatBuffer: copy past the end");
      std::copy_n(host_.data() + offset, count, dst);
    } else {
      model::copy_to_host(dst, dev_, offset, count);
    }
  }
  std::vector<float> to_host() const {
    std::vector<float> out(size());
    copy_to_host(out.data(), 0, out.size());
    return out;
  }
  // The values as host memory: the storage itself on the CPU (no copy), else a copy in scratch.
  const float* host_view(std::vector<float>& scratch) const {
    if (device_ == Device::kCpu) return host_.data();
    scratch = to_host();
    return scratch.data();
  }
  // The host storage itself: CPU only (throws std::logic_error on a device).
  ZeroPageVector<float>& host() {
    if (device_ != Device::kCpu) detail::host_access_on_device("FlatBuffer::host");
    return host_;
  }

 private:
  Device device_;
  ZeroPageVector<float> host_;  // kCpu
  Buffer<float> dev_;           // other devices
};

}  // namespace loopmoe::model
