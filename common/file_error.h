// The exception common/'s file helpers throw by default.
#pragma once

#include <stdexcept>

namespace loopmoe::common {

// A file could not be read or written. The message names the file first, then what went wrong
// (with the system's reason where there is one), so a command can print it as-is.
class FileError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace loopmoe::common
