// Internal to comm/ (not part of its public API): keeps SIGPIPE from killing the process when a
// peer's socket is gone.
#pragma once

#include <signal.h>

namespace loopmoe::comm::internal {

// Gloo's TCP transport does not suppress SIGPIPE, so writing to a socket whose peer has closed it
// raises SIGPIPE, whose default action kills the process: a dead peer would take this process down
// instead of becoming an exception (seen in this project's timeout test). While a SigpipeGuard
// lives, SIGPIPE is blocked for the calling thread, so the write fails with EPIPE, which Gloo
// reports as an error; a SIGPIPE raised meanwhile is consumed before the old mask comes back.
// Threads inherit their creator's mask, so Gloo's device thread, created under a guard, never
// receives SIGPIPE at all. The process-wide disposition is left alone: that is the application's.
class SigpipeGuard {
 public:
  SigpipeGuard();
  SigpipeGuard(const SigpipeGuard&) = delete;
  SigpipeGuard& operator=(const SigpipeGuard&) = delete;
  ~SigpipeGuard();

 private:
  sigset_t old_mask_;
};

}  // namespace loopmoe::comm::internal
