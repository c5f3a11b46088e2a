// The report (report.h): gathers the runs, writes report_data.json, draws the plots and writes the
// Markdown file; and the mean ± std the tables use.
#include "experiment/report.h"

#include <cmath>
#include <ctime>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/atomic_file.h"
#include "experiment/report_internal.h"
#include "model/error.h"
#include "train/format.h"

namespace loopmoe::experiment {
namespace {

namespace fs = std::filesystem;
using report_internal::gather;
using report_internal::Gathered;
using report_internal::Markdown;
using report_internal::plot_data;
using report_internal::run_plot_script;
using report_internal::VariantData;

// Plot files the script writes; removed before each run so a stale plot is never shown.
const std::vector<std::pair<std::string, std::string>> kPlots = {
    {"val_loss.png", "Training and validation loss (mean per variant, seeds faint)"},
    {"routing_heatmap.png", "Expert load per layer × iteration (share of routed token slots)"},
    {"logit_lens.png", "Loss per iteration (logit lens)"},
    {"loop_sweep.png", "Loss vs inference loop count, and adaptive halting"},
    {"lr_sweep.png", "Learning-rate sweep"},
};

}  // namespace

MeanStd mean_std(const std::vector<double>& values) {
  MeanStd m;
  double sum = 0;
  for (double x : values) {
    if (!std::isfinite(x)) continue;
    sum += x;
    ++m.n;
  }
  if (m.n == 0) {
    m.mean = NAN;
    m.std = NAN;
    return m;
  }
  m.mean = sum / m.n;
  if (m.n < 2) {
    m.std = NAN;
    return m;
  }
  double ss = 0;
  for (double x : values) {
    if (std::isfinite(x)) ss += (x - m.mean) * (x - m.mean);
  }
  m.std = std::sqrt(ss / (m.n - 1));
  return m;
}

std::string format_mean_std(const MeanStd& m, int precision, double scale) {
  if (m.n == 0) return "n/a";
  std::string s = train::format_fixed(m.mean * scale, precision);
  if (m.n >= 2) s += " ± " + train::format_fixed(m.std * scale, precision);
  return s;
}

ReportResult write_report(const ReportOptions& opt) {
  const fs::path root(opt.runs_dir);
  if (!fs::is_directory(root)) throw model::ConfigError(opt.runs_dir + ": no such directory");
  Gathered g = gather(root);
  int finished = 0;
  for (const VariantData& v : g.variants) finished += static_cast<int>(v.runs.size());
  if (finished == 0) {
    throw model::ConfigError(opt.runs_dir +
                             ": no finished runs (run directories with a `done` marker, " +
                             "under runs/ or directly inside)");
  }
  ReportResult result;
  const fs::path out_file = opt.out_file.empty() ? root / "report.md" : fs::path(opt.out_file);
  const fs::path out_dir = out_file.parent_path().empty() ? fs::path(".") : out_file.parent_path();
  const fs::path plots_dir = opt.plots_dir.empty() ? out_dir / "plots" : fs::path(opt.plots_dir);
  fs::create_directories(out_dir);
  result.report_path = out_file.string();
  const fs::path data_path = out_dir / "report_data.json";
  result.data_path = data_path.string();
  common::write_file_atomically(
      data_path, plot_data(g).dump(1) + "\n", [](const common::WriteFailure& f) {
        if (f.step == common::WriteStep::kCreate || f.step == common::WriteStep::kWrite) {
          throw std::runtime_error(f.path.string() + ": cannot write");
        }
        throw std::runtime_error(f.message());
      });

  if (opt.plots) {
    fs::create_directories(plots_dir);
    for (const auto& [file, title] : kPlots) fs::remove(plots_dir / file);
    const std::string script = opt.plot_script.empty() ? find_plot_script() : opt.plot_script;
    result.plot_note = run_plot_script(opt.python, script, data_path, plots_dir);
  } else {
    result.plot_note = "plots disabled (--no-plots)";
  }

  Markdown md;
  std::string name = g.experiment.is_object() ? g.experiment.value("name", "") : "";
  md.line("# LoopMoE experiment report" + (name.empty() ? "" : ": " + name));
  md.line();
  {
    const std::time_t t = std::time(nullptr);
    std::tm tm{};
    gmtime_r(&t, &tm);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M UTC", &tm);
    md.line(std::string("Written ") + buf +
            " by `loopmoe report`. Vanilla MoE against LoopMoE at "
            "matched parameters, FLOPs per token and attention:FFN ratio (docs/EXPERIMENTS.md).");
  }
  md.line();
  section_what(md, g, opt);
  section_budget(md, g);
  section_sweep(md, g);
  section_results(md, g);
  section_scale(md, g);
  section_routing(md, g);
  section_loops(md, g);

  md.line("## Plots");
  md.line();
  const fs::path rel_plots = plots_dir.lexically_proximate(out_dir);
  for (const auto& [file, title] : kPlots) {
    if (!fs::exists(plots_dir / file)) continue;
    result.plots.push_back((plots_dir / file).string());
    md.line("### " + title);
    md.line();
    md.line("![" + title + "](" + (rel_plots / file).generic_string() + ")");
    md.line();
  }
  if (!result.plot_note.empty()) {
    md.line("> **Plots were not drawn**: " + result.plot_note +
            ". The tables above are "
            "complete; rerun `loopmoe report` once plotting works.");
    md.line();
  } else if (result.plots.empty()) {
    md.line("No plot had data to show.");
    md.line();
  }
  if (!g.notes.empty()) {
    md.line("## Notes");
    md.line();
    for (const std::string& n : g.notes) md.line("- " + n);
    md.line();
  }
  common::write_file_atomically(out_file, md.str(), [](const common::WriteFailure& f) {
    if (f.step == common::WriteStep::kCreate || f.step == common::WriteStep::kWrite) {
      throw std::runtime_error(f.tmp.string() + ": cannot write");
    }
    throw std::runtime_error(f.message());
  });
  return result;
}

}  // namespace loopmoe::experiment
