// `loopmoe-service`: the training-service commands of `loopmoe`, in their own binary because they
// link libprotobuf, which cannot share a process with libsentencepiece's bundled protobuf copy.
// `loopmoe submit ...` runs `loopmoe-service submit ...`; it can also be run directly.
#include <cstdio>
#include <exception>

#include "cli/service/service.h"

int main(int argc, char** argv) {
  CLI::App app{"LoopMoE training service commands", "loopmoe"};
  app.require_subcommand(1);
  loopmoe::register_service_commands(app);
  loopmoe::register_cluster_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
