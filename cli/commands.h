// Subcommands of the `loopmoe` CLI; each registers itself on the root app.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

namespace loopmoe::cli {

// CLI::PositiveNumber and CLI::NonNegativeNumber (same help text) with a short message
// ("--loops: 0 is not positive"): CLI11 2.1's own spell out their range up to DBL_MAX.
inline CLI::Validator number_check(bool allow_zero) {
  return CLI::Validator(
      [allow_zero](std::string& input) -> std::string {
        double value = 0;
        if (!CLI::detail::lexical_cast(input, value)) return input + " is not a number";
        if (value < 0 || (value == 0 && !allow_zero)) {
          return input + (allow_zero ? " is negative" : " is not positive");
        }
        return {};
      },
      allow_zero ? "NONNEGATIVE" : "POSITIVE");
}
inline const CLI::Validator kPositiveNumber = number_check(false);
inline const CLI::Validator kNonNegativeNumber = number_check(true);

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

}  // namespace loopmoe::cli
