// loopmoe_bench --device cuda[:N] (compiled only in a CUDA build: bench/CMakeLists.txt).
#pragma once

#include <string>
#include <vector>

#include "bench/bench_common.h"

namespace loopmoe::bench {

struct GpuOptions {
  std::string device = "cuda";  // as given to --device (use_device already selected it)
  int steps = 10, warmup = 2, torch_steps = 10;
  double max_seconds = 0;  // > 0: a case's timed steps stop once they took this long
  std::string peer, python = "python3";
  std::vector<std::string> peer_variants = {"eager"};
  bool no_torch = false, json = false;
  int profile_steps = 0;  // > 0: the op profile of that many more steps per case (--profile)
};

// Measures the bf16 cuBLAS GEMM rate (8192^3), then each case on the current CUDA device, then
// (unless no_torch) the peer's variants on the same GPU; prints a table or JSON lines. Returns
// the exit code: 0, or 1 when a case's loss was not finite. Throws std::runtime_error on a CUDA
// or cuBLAS failure.
int run_gpu(const std::vector<Case>& cases, const GpuOptions& options);

}  // namespace loopmoe::bench
