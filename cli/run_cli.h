// How both executables (`loopmoe` and `loopmoe-service`) end: one format for every subcommand.
//   --help                        the help on stdout, exit 0
//   a usage error CLI11 finds     "error: <what>" on stderr, exit common::kUsageExitCode (2): an
//   (unknown or missing option,   unknown option, a missing or invalid value, a file that does not
//   bad value, no subcommand)     exist (checks such as CLI::ExistingFile), no subcommand
//   a command's exception         "error: <what>" on stderr, exit common::kErrorExitCode (1)
#pragma once

#include <CLI/CLI.hpp>
#include <cstdio>

#include "common/run_main.h"

namespace loopmoe::cli {

// Parses argv into `app`, which runs the chosen command's callback, and returns the exit code.
// `line` is how a command's error is printed (common::ErrorLine; a usage error is always printed
// as-is, since no command has started).
inline int run_cli(CLI::App& app, int argc, char** argv,
                   common::ErrorLine line = common::ErrorLine::kAsIs) {
  return common::run_main(
      [&] {
        try {
          app.parse(argc, argv);
        } catch (const CLI::ParseError& e) {
          // --help (exit code 0) prints the help; a RuntimeError carries a command's own exit code
          // and has printed its message already.
          if (e.get_exit_code() == 0 || e.get_name() == "RuntimeError") return app.exit(e);
          std::fprintf(stderr, "error: %s\n", e.what());
          return common::kUsageExitCode;
        }
        return 0;
      },
      line);
}

}  // namespace loopmoe::cli
