// The report's plots: finding scripts/plot_report.py and running it on report_data.json.
#include <filesystem>
#include <stdexcept>
#include <string>

#include "common/subprocess.h"
#include "experiment/report.h"
#include "experiment/report_internal.h"

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
  common::SpawnOptions options;
  options.log = log;
  int status = 0;
  try {
    status = common::wait_for(
        common::spawn_logged({python, script, data.string(), plots_dir.string()}, options));
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  if (common::exited_ok(status)) return "";
  // The last lines of the script's output say why (e.g. no matplotlib).
  return "the plot script failed (" + log.string() + "): " + common::tail_lines(log, 3, " | ");
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
