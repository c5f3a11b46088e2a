// Choosing the device a process trains on (`--device` of loopmoe train, eval and audit): sets
// model/buffer.h's default device before any model is built. A Model then stays there (model.h).
#pragma once

#include <string>

#include "model/buffer.h"

namespace loopmoe::model {

// "cpu", "cuda" (device 0), "cuda:N", or the test-only "host-as-device" (the emulated device of
// buffer.h: CPU kernels on host memory treated as device memory). Sets the default device and
// returns it; throws std::runtime_error with one clear sentence when the spec is malformed, the
// build has no CUDA backend or the machine has no such device.
Device use_device(const std::string& spec);

// For progress lines: "cpu", "cuda:N" with its peak memory so far ("cuda:0, peak 1.2 GiB").
std::string device_summary();

}  // namespace loopmoe::model
