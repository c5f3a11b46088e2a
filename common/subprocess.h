// Starting a program with its output in a log file (posix_spawn; no shell): the plot script of a
// report, openssl for `cluster up`'s throwaway CA, and `cluster up`'s processes.
#pragma once

#include <sys/types.h>
#include <sys/wait.h>

#include <filesystem>
#include <functional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace loopmoe::common {

struct SpawnOptions {
  // stdout and stderr both go to this file (created with `log_mode`); stdin is /dev/null.
  std::filesystem::path log;
  bool append_log = false;  // else the log is truncated
  unsigned log_mode = 0644;
  // Look argv[0] up on PATH (posix_spawnp) instead of taking it as a path.
  bool search_path = false;
  // Put the child in a process group of its own, so a Ctrl-C in the terminal reaches only us.
  bool own_process_group = false;
  // Which of our environment variables ("NAME=value") the child gets; all when empty.
  std::function<bool(std::string_view)> keep_env;
};

// Starts argv with an empty signal mask (a caller that blocks signals must not pass that on).
// Throws std::runtime_error "cannot start <argv[0]>: <reason>" when it cannot be started.
pid_t spawn_logged(const std::vector<std::string>& argv, const SpawnOptions& options);

// Waits for `pid` (retrying on EINTR) and returns its wait status.
int wait_for(pid_t pid);

// "exited with status 3", "was killed by Killed", ...
std::string exit_description(int status);
inline bool exited_ok(int status) { return WIFEXITED(status) && WEXITSTATUS(status) == 0; }

// The last `lines` lines of a text file, joined by `separator` ("" when it cannot be read).
std::string tail_lines(const std::filesystem::path& path, int lines, std::string_view separator);

}  // namespace loopmoe::common
