// Elapsed wall time.
#pragma once

#include <chrono>

namespace loopmoe::common {

// Seconds from `start` to now on start's clock (steady_clock for durations).
template <class Clock, class Duration>
double seconds_since(std::chrono::time_point<Clock, Duration> start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace loopmoe::common
