// Exceptions raised by comm/: rendezvous, key-value stores and collectives.
#pragma once

#include <stdexcept>

namespace loopmoe::comm {

// A collective or a rendezvous failed: a peer closed its connection, a transport or CUDA/NCCL
// call failed, or a store held something unexpected. A Communicator that has thrown one is
// unusable afterwards (its peers are in an unknown state); create a new one.
class CommError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A deadline passed: a peer did not arrive in time because it is dead, hung, or not calling the
// same collective. Derives from CommError so callers that only care "it failed" catch one type.
class TimeoutError : public CommError {
 public:
  using CommError::CommError;
};

}  // namespace loopmoe::comm
