// `loopmoe experiment --spec FILE`: the grid of runs behind the report (docs/EXPERIMENTS.md).
#include <memory>
#include <string>

#include "cli/commands.h"
#include "experiment/experiment.h"
#include "model/device.h"

namespace loopmoe::cli {
namespace {

// `--time-limit` stopped the grid with runs left: not an error, but a script must rerun.
constexpr int kIncompleteExitCode = 3;

}  // namespace

void register_experiment_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "experiment",
      "Run an experiment grid: learning-rate sweep for both families, then every variant x seed "
      "(train, audit, eval); rerun the same command to resume");
  struct Args {
    std::string spec;
    std::string out;
    experiment::ExperimentOptions options;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("--spec", args->spec, "experiment spec (TOML; docs/EXPERIMENTS.md)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--out", args->out, "output directory (default: experiments/NAME)");
  cmd->add_flag("--dry-run", args->options.dry_run,
                "print the plan (configs, parameters, FLOPs, measured time estimate) and exit");
  cmd->add_flag("--verbose", args->options.verbose, "show the trainer's progress lines");
  cmd->add_option("--device", args->options.device,
                  "cpu, cuda or cuda:N: where every run trains, is audited and evaluated")
      ->capture_default_str();
  cmd->add_option("--time-limit", args->options.time_limit,
                  "seconds this invocation may take; runs that would not finish in time are left "
                  "for the next one (exit code 3 while runs remain; 0: no limit)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->callback([args] {
    const experiment::ExperimentSpec spec = experiment::load_experiment_spec(args->spec);
    experiment::ExperimentOptions options = args->options;
    model::use_device(options.device);  // before any model is built: every run stays there
    options.out_dir = args->out.empty() ? "experiments/" + spec.name : args->out;
    options.command = "loopmoe experiment --spec " + args->spec + " --out " + options.out_dir;
    if (options.device != "cpu") options.command += " --device " + options.device;
    const experiment::ExperimentSummary summary = experiment::run_experiment(spec, options);
    if (summary.remaining > 0) throw CLI::RuntimeError(kIncompleteExitCode);
  });
}

}  // namespace loopmoe::cli
