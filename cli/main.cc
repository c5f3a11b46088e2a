// `loopmoe`: train and compare looped and vanilla Mixture-of-Experts language models.
#include <cstdio>
#include <exception>

#include "cli/commands.h"
#include "cli/data_command.h"

int main(int argc, char** argv) {
  CLI::App app{"LoopMoE: train looped and vanilla Mixture-of-Experts language models"};
  app.require_subcommand(1);
  loopmoe::register_data_command(app);
  loopmoe::register_train_command(app);
  loopmoe::register_compare_command(app);
  loopmoe::register_budget_command(app);
  loopmoe::register_audit_command(app);
  loopmoe::register_eval_command(app);
  loopmoe::register_experiment_command(app);
  loopmoe::register_report_command(app);
  loopmoe::register_service_commands(app);
  loopmoe::register_cluster_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "\nerror: %s\n", e.what());
    return 1;
  }
  return 0;
}
