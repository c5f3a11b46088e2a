#include "comm/sigpipe_guard.h"

#include <pthread.h>

#include <cerrno>
#include <ctime>

namespace loopmoe::comm::internal {
namespace {

sigset_t sigpipe_set() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGPIPE);
  return set;
}

}  // namespace

SigpipeGuard::SigpipeGuard() {
  const sigset_t pipe = sigpipe_set();
  pthread_sigmask(SIG_BLOCK, &pipe, &old_mask_);
}

SigpipeGuard::~SigpipeGuard() {
  if (sigismember(&old_mask_, SIGPIPE) == 1) return;  // blocked already: not ours to drain
  const int saved_errno = errno;
  sigset_t pending;
  if (sigpending(&pending) == 0 && sigismember(&pending, SIGPIPE) == 1) {
    const sigset_t pipe = sigpipe_set();
    const timespec no_wait{0, 0};
    while (sigtimedwait(&pipe, nullptr, &no_wait) < 0 && errno == EINTR) {
    }
  }
  pthread_sigmask(SIG_SETMASK, &old_mask_, nullptr);
  errno = saved_errno;
}

}  // namespace loopmoe::comm::internal
