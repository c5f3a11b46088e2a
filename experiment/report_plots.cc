// The report's plots: finding scripts/plot_report.py and running it on report_data.json.
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>

#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "common/text_file.h"
#include "experiment/report.h"
#include "experiment/report_internal.h"

extern char** environ;

namespace loopmoe::experiment {
namespace report_internal {

std::string run_plot_script(const std::string& python, const std::string& script,
                            const fs::path& data, const fs::path& plots_dir) {
  if (!fs::exists(python)) return python + " not found";
  if (script.empty() || !fs::exists(script)) {
    return "plot script not found (" + (script.empty() ? "scripts/plot_report.py" : script) +
           "; pass --plot-script)";
  }
  const fs::path log = plots_dir / "plot_log.txt";
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  std::vector<std::string> args = {python, script, data.string(), plots_dir.string()};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, python.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) return "cannot start " + python + ": " + std::strerror(rc);
  int status = 0;
  if (waitpid(pid, &status, 0) < 0) return "waitpid failed";
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return "";
  // The last lines of the script's output say why (e.g. no matplotlib).
  std::istringstream in(common::read_text_if_present(log).value_or(""));
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  std::string tail;
  for (size_t i = lines.size() > 3 ? lines.size() - 3 : 0; i < lines.size(); ++i) {
    tail += (tail.empty() ? "" : " | ") + lines[i];
  }
  return "the plot script failed (" + log.string() + "): " + tail;
}

}  // namespace report_internal

std::string find_plot_script() {
  namespace fs = std::filesystem;
  const fs::path rel = fs::path("scripts") / "plot_report.py";
  if (fs::exists(rel)) return fs::absolute(rel).string();
  std::error_code ec;
  fs::path dir = fs::read_symlink("/proc/self/exe", ec).parent_path();
  // build/loopmoe → the repository two levels up; build/tests/loopmoe_tests → three.
  for (int up = 0; !ec && up < 3 && !dir.empty(); ++up, dir = dir.parent_path()) {
    if (fs::exists(dir / rel)) return (dir / rel).string();
    if (dir == dir.parent_path()) break;
  }
  return "";
}

}  // namespace loopmoe::experiment
