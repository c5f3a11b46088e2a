// The training-service commands (submit, status, list, cancel, logs, cluster up), built into the
// `loopmoe-service` helper that `loopmoe` runs for them (cli/service_command.cc says why).
#pragma once

#include <CLI/CLI.hpp>

namespace loopmoe::cli {

// `loopmoe cluster up`'s default --dir; its credentials are in DIR/credentials, where the other
// service commands look for them unless told otherwise (docs/SERVICE.md "Security").
inline constexpr char kDefaultClusterDir[] = ".loopmoe-cluster";

void register_service_commands(CLI::App& app);
void register_cluster_command(CLI::App& app);

}  // namespace loopmoe::cli
