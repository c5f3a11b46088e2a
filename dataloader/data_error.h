// Error type for everything under dataloader/.
#pragma once

#include <stdexcept>

namespace loopmoe::dataloader {

// Thrown for bad input data, corrupt shards and failed I/O. The message always names the offending
// file (or option) first and then what is wrong, so the CLI can print it as-is.
class DataError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace loopmoe::dataloader
