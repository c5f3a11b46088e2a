// The experiment report (docs/EXPERIMENTS.md): one Markdown file with the budget (analytic and
// measured), the learning-rate sweep, results as mean ± std over seeds, routing statistics and
// PNG plots drawn by scripts/plot_report.py from the gathered OUT/report_data.json.
#pragma once

#include <string>
#include <vector>

namespace loopmoe::experiment {

struct ReportOptions {
  std::string runs_dir;   // experiment output (holds runs/), or a directory of run directories
  std::string out_file;   // default: runs_dir/report.md
  std::string plots_dir;  // default: plots/ next to out_file
  std::string python = "/usr/bin/python3";  // Debian's interpreter, which has matplotlib
  std::string plot_script;                  // default: find_plot_script()
  bool plots = true;
};

struct ReportResult {
  std::string report_path;
  std::string data_path;           // report_data.json (input of the plot script)
  std::vector<std::string> plots;  // PNG files written
  std::string plot_note;           // why plots are missing, when they are
};

// Gathers every run, writes report_data.json, draws the plots and writes the report. Plotting
// failures never lose the tables: the report is written with a note instead.
ReportResult write_report(const ReportOptions& options);

// scripts/plot_report.py relative to the working directory, else relative to the source tree
// the running binary was built in (its directory's ancestors); empty when not found.
std::string find_plot_script();

struct MeanStd {
  double mean = 0;
  double std = 0;  // sample standard deviation (n - 1); NaN when n < 2
  int n = 0;       // finite values used
};
// Non-finite values are ignored (a missing metric does not poison the mean).
MeanStd mean_std(const std::vector<double>& values);
// "4.1234 ± 0.0123"; n = 1: "4.1234"; n = 0: "n/a". Values are multiplied by `scale` first.
std::string format_mean_std(const MeanStd& m, int precision, double scale = 1.0);

}  // namespace loopmoe::experiment
