// `loopmoe report --runs DIR`: the experiment report (docs/EXPERIMENTS.md).
#include <cstdio>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "experiment/report.h"

namespace loopmoe::cli {

void register_report_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "report",
      "Write the Markdown report (budget, LR sweep, results, routing, plots) of an "
      "experiment directory");
  auto opt = std::make_shared<experiment::ReportOptions>();
  cmd->add_option("--runs", opt->runs_dir,
                  "experiment output directory (written by loopmoe experiment), or a directory "
                  "of run directories named VARIANT_sSEED")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--out", opt->out_file, "report file (default: RUNS/report.md)");
  cmd->add_option("--plots-dir", opt->plots_dir, "PNG directory (default: plots/ next to --out)");
  cmd->add_option("--python", opt->python, "interpreter with matplotlib")->capture_default_str();
  cmd->add_option("--plot-script", opt->plot_script,
                  "plot script (default: scripts/plot_report.py under the working directory, "
                  "else in the source tree of this binary)");
  cmd->add_flag("!--no-plots", opt->plots, "tables only");
  cmd->callback([opt] {
    const experiment::ReportResult r = experiment::write_report(*opt);
    std::printf("report: %s (%zu plots)\n", r.report_path.c_str(), r.plots.size());
    if (!r.plot_note.empty()) std::fprintf(stderr, "warning: %s\n", r.plot_note.c_str());
  });
}

}  // namespace loopmoe::cli
