// `loopmoe`: train and compare looped and vanilla Mixture-of-Experts language models.
#include "cli/commands.h"
#include "cli/data_command.h"
#include "cli/run_cli.h"

int main(int argc, char** argv) {
  CLI::App app{"LoopMoE: train looped and vanilla Mixture-of-Experts language models"};
  app.require_subcommand(1);
  loopmoe::cli::register_data_command(app);
  loopmoe::cli::register_train_command(app);
  loopmoe::cli::register_compare_command(app);
  loopmoe::cli::register_budget_command(app);
  loopmoe::cli::register_audit_command(app);
  loopmoe::cli::register_eval_command(app);
  loopmoe::cli::register_experiment_command(app);
  loopmoe::cli::register_report_command(app);
  loopmoe::cli::register_service_commands(app);
  loopmoe::cli::register_cluster_command(app);
  // A command's error may interrupt its progress line ("training ..."), so it gets a line of its
  // own.
  return loopmoe::cli::run_cli(app, argc, argv, loopmoe::common::ErrorLine::kOwnLine);
}
