// `loopmoe experiment --spec FILE`: the grid of runs behind the report (docs/EXPERIMENTS.md).
#include <memory>
#include <string>

#include "cli/commands.h"
#include "experiment/experiment.h"

namespace loopmoe::cli {

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
  cmd->callback([args] {
    const experiment::ExperimentSpec spec = experiment::load_experiment_spec(args->spec);
    experiment::ExperimentOptions options = args->options;
    options.out_dir = args->out.empty() ? "experiments/" + spec.name : args->out;
    options.command = "loopmoe experiment --spec " + args->spec + " --out " + options.out_dir;
    experiment::run_experiment(spec, options);
  });
}

}  // namespace loopmoe::cli
