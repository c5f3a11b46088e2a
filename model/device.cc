#include "model/device.h"

#include <cstdio>
#include <stdexcept>

namespace loopmoe::model {
namespace {
int g_cuda_ordinal = 0;  // the one use_device selected
}  // namespace

Device use_device(const std::string& spec) {
  if (spec == "cpu") {
    set_default_device(Device::kCpu);
    return Device::kCpu;
  }
  if (spec == "host-as-device") {
    set_default_device(Device::kHostAsDevice);
    return Device::kHostAsDevice;
  }
  if (spec == "cuda" || spec.starts_with("cuda:")) {
    int ordinal = 0;
    if (spec.size() > 5) {
      size_t used = 0;
      try {
        ordinal = std::stoi(spec.substr(5), &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != spec.size() - 5 || ordinal < 0) {
        throw std::runtime_error("--device " + spec + ": expected cuda:N with N a device number");
      }
    }
    if (!detail::device_available()) {
      throw std::runtime_error("--device " + spec +
                               ": no CUDA device (this build has no CUDA backend, or the machine "
                               "has no usable GPU); use --device cpu");
    }
    detail::device_select(ordinal);
    set_default_device(Device::kCuda);
    g_cuda_ordinal = ordinal;
    return Device::kCuda;
  }
  throw std::runtime_error("--device " + spec + ": expected cpu, cuda or cuda:N");
}

std::string device_summary() {
  const Device device = default_device();
  if (device != Device::kCuda) return to_string(device);
  char text[64];
  std::snprintf(text, sizeof text, "cuda:%d, peak %.2f GiB", g_cuda_ordinal,
                static_cast<double>(detail::device_peak_bytes()) / (1ull << 30));
  return text;
}

}  // namespace loopmoe::model
