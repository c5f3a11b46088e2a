// All-to-all traffic of one process, for the step reports and metrics.
#pragma once

#include <chrono>
#include <cstdint>

#include "common/clock.h"

namespace loopmoe::runtime {

struct AllToAllStats {
  int64_t bytes_sent = 0;
  double seconds = 0;

  // Times `op` (a collective) and counts the bytes it sends.
  template <typename Op>
  void timed(int64_t bytes, Op&& op) {
    const auto t0 = std::chrono::steady_clock::now();
    op();
    seconds += common::seconds_since(t0);
    bytes_sent += bytes;
  }
};

}  // namespace loopmoe::runtime
