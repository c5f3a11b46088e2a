// Exceptions LoopMoE raises for bad input; the CLI prints what() as one line and exits non-zero.
#pragma once

#include <stdexcept>
#include <string>

namespace loopmoe::model {

class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class CheckpointError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace loopmoe::model
