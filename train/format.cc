#include "train/format.h"

#include <cmath>
#include <cstdio>

namespace loopmoe::train {

std::string format_seconds(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const long s = std::lround(seconds);
  char buf[32];
  if (s >= 3600) {
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, (s / 60) % 60);
  } else {
    std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  }
  return buf;
}

std::string format_fixed(double x, int precision) {
  if (!std::isfinite(x)) return "n/a";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", precision, x);
  return buf;
}

std::string format_si(double x, int digits) {
  if (!std::isfinite(x)) return "n/a";
  const double ax = std::fabs(x);
  const double scale = ax >= 1e9 ? 1e9 : ax >= 1e6 ? 1e6 : ax >= 1e3 ? 1e3 : 1.0;
  const char* suffix = ax >= 1e9 ? "G" : ax >= 1e6 ? "M" : ax >= 1e3 ? "k" : "";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*g%s", digits, x / scale, suffix);
  return buf;
}

}  // namespace loopmoe::train
