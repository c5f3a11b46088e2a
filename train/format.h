// Number and duration formatting shared by the CLI's progress lines, tables and reports.
#pragma once

#include <string>

namespace loopmoe::train {

// "3m10s", "1h02m"; "?" for negative or non-finite input.
std::string format_seconds(double seconds);
// Fixed-point with `precision` decimals; "n/a" for non-finite input.
std::string format_fixed(double x, int precision);
// `digits` significant digits with a k / M / G suffix ("4.2M"); "n/a" for non-finite input.
std::string format_si(double x, int digits);

}  // namespace loopmoe::train
