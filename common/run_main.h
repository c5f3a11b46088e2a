// The error handling of a command's main(): run the body; an exception that escapes it becomes one
// line "error: <what>" on stderr and exit code 1. The service's executables (coordinator, worker,
// expert shard) name themselves in that line, "error: loopmoe-worker: <what>", because under
// `loopmoe cluster up` and in a pod's aggregated logs several of them share one stream.
#pragma once

#include <cstdio>
#include <exception>
#include <type_traits>

namespace loopmoe::common {

// The exit code of a command that failed with an exception.
inline constexpr int kErrorExitCode = 1;
// The exit code of a command line that could not be used (unknown option, bad value, missing
// argument); cli/run_cli.h prints its "error: <what>" line.
inline constexpr int kUsageExitCode = 2;

enum class ErrorLine {
  kAsIs,     // "error: <what>\n"
  kOwnLine,  // "\nerror: <what>\n": ends a progress line the command may have left open
};

// Returns what `body` returns (an int exit code), or 0 for a void body; kErrorExitCode when it
// throws a std::exception, after printing the error line ("error: <program>: <what>" when
// `program` is given).
template <class Body>
int run_main(Body&& body, ErrorLine line = ErrorLine::kAsIs, const char* program = nullptr) {
  try {
    if constexpr (std::is_void_v<std::invoke_result_t<Body&>>) {
      body();
      return 0;
    } else {
      return body();
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%serror: %s%s%s\n", line == ErrorLine::kOwnLine ? "\n" : "",
                 program ? program : "", program ? ": " : "", e.what());
    return kErrorExitCode;
  }
}

}  // namespace loopmoe::common
