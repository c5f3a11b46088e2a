// Subcommands of the `loopmoe` CLI; each registers itself on the root app.
#pragma once

#include <CLI/CLI.hpp>

namespace loopmoe {

void register_train_command(CLI::App& app);
void register_compare_command(CLI::App& app);
void register_budget_command(CLI::App& app);
void register_audit_command(CLI::App& app);
void register_eval_command(CLI::App& app);
void register_experiment_command(CLI::App& app);
void register_report_command(CLI::App& app);
// The training service (docs/SERVICE.md): submit, status, list, cancel, logs; cluster up.
void register_service_commands(CLI::App& app);
void register_cluster_command(CLI::App& app);

}  // namespace loopmoe
