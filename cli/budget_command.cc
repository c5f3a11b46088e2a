// `loopmoe budget --config VANILLA.toml --loops R`: the LoopMoE counterpart of a Vanilla MoE
// config under a capacity-balancing rule, with both models' figures side by side
// (DESIGN.md §1, docs/BUDGET.md).
#include <cstdio>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>

#include "cli/commands.h"
#include "common/atomic_file.h"
#include "model/budget.h"
#include "model/config.h"

namespace loopmoe::cli {

void register_budget_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "budget", "Solve the LoopMoE config matching a Vanilla MoE config (params, FLOPs, ratio)");
  struct Args {
    std::string config, balance = "experts", iter_adaln = "joint", write;
    int loops = 0;
    double expert_scale = 1.0;
    int cond_dim = 0;
    bool json = false;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("--config", args->config, "the Vanilla MoE reference config (TOML)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--loops", args->loops, "loop count R of the LoopMoE (divides n_layers)")
      ->required()
      ->check(kPositiveNumber);
  cmd->add_option("--balance", args->balance, "capacity-balancing rule: experts | width | none")
      ->capture_default_str();
  cmd->add_option("--iter-adaln", args->iter_adaln, "IterAdaLN mode: joint | iter | token | off")
      ->capture_default_str();
  cmd->add_option("--expert-scale", args->expert_scale,
                  "multiply the rule's expert count (sensitivity ablation, e.g. 0.5, 1.5)")
      ->capture_default_str()
      ->check(kPositiveNumber);
  cmd->add_option("--cond-dim", args->cond_dim,
                  "fix IterAdaLN's conditioning width d_c (even, >= 2) instead of searching it; "
                  "head_dim and the expert count are still solved")
      ->check(kPositiveNumber);
  cmd->add_flag("--json", args->json, "print a JSON object instead of the table");
  cmd->add_option("--write", args->write,
                  "write the solved LoopMoE config (the reference's [train] and [data]) as TOML");
  cmd->callback([args] {
    const model::Config vanilla = model::load_config(args->config);
    const int batch_tokens = vanilla.train.batch_size * vanilla.model.seq_len;
    const model::SolvedBudget solved =
        model::solve_budget(vanilla.model, args->loops, model::parse_balance(args->balance),
                            model::parse_iter_adaln_mode(args->iter_adaln), args->expert_scale,
                            batch_tokens, args->cond_dim);
    if (args->json) {
      std::printf("%s\n", model::budget_json(solved).c_str());
    } else {
      std::printf("%s", model::budget_table(solved).c_str());
    }
    // The rule is reported, not enforced, beyond `experts` (other rules and scaled expert counts
    // differ by design); warn when the matching rule itself misses the acceptance bound.
    if (solved.balance == model::Balance::kExperts && solved.expert_scale == 1.0 &&
        model::max_matched_diff(solved) > model::kBudgetTolerance) {
      std::fprintf(stderr, "warning: matched figures differ by %.3f%% (> %.1f%%)\n",
                   100 * model::max_matched_diff(solved), 100 * model::kBudgetTolerance);
    }
    if (!args->write.empty()) {
      model::Config out = vanilla;
      out.model = solved.loopmoe_config;
      model::validate(out);
      std::ostringstream f;
      f << "# LoopMoE config solved by `loopmoe budget` from " << args->config << "\n"
        << "# (loops " << args->loops << ", balance " << to_string(solved.balance)
        << ", expert_scale " << solved.expert_scale
        << (args->cond_dim > 0 ? ", cond_dim " + std::to_string(args->cond_dim) : std::string())
        << "; docs/BUDGET.md).\n\n"
        << model::to_toml(out);
      // Written whole and renamed: an existing config is replaced only by a complete one.
      common::write_file_atomically(args->write, f.str(), [](const common::WriteFailure& e) {
        if (e.step == common::WriteStep::kCreate) {
          throw std::runtime_error(e.path.string() + ": cannot open for writing");
        }
        if (e.step == common::WriteStep::kWrite) {
          throw std::runtime_error(e.path.string() + ": write failed");
        }
        throw std::runtime_error(e.message());
      });
      std::fprintf(stderr, "wrote %s\n", args->write.c_str());
    }
  });
}

}  // namespace loopmoe::cli
