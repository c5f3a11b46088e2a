// `loopmoe-service`: the training-service commands of `loopmoe`, in their own binary because they
// link libprotobuf, which cannot share a process with libsentencepiece's bundled protobuf copy.
// `loopmoe submit ...` runs `loopmoe-service submit ...`; it can also be run directly.
#include "cli/run_cli.h"
#include "cli/service/service.h"

int main(int argc, char** argv) {
  CLI::App app{"LoopMoE training service commands", "loopmoe"};
  app.require_subcommand(1);
  loopmoe::cli::register_service_commands(app);
  loopmoe::cli::register_cluster_command(app);
  return loopmoe::cli::run_cli(app, argc, argv);
}
