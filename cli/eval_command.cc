#include <algorithm>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "cli/commands.h"
#include "eval/eval_tasks.h"
#include "eval/evaluator.h"
#include "model/device.h"

namespace loopmoe::cli {
namespace {

// Held-out loss per domain of the dataset (eval.json "domains"); "-" where a domain's validation
// text is shorter than one window.
void print_domains(const nlohmann::json& domains, std::FILE* out) {
  int width = 6;
  for (const auto& d : domains) {
    width = std::max(width, static_cast<int>(d["name"].get<std::string>().size()));
  }
  std::fprintf(out, "\nper domain (windows inside each domain's validation text)\n");
  std::fprintf(out, "  %-*s  %8s  %10s  %10s  %12s\n", width, "domain", "loss", "perplexity",
               "tokens", "val tokens");
  for (const auto& d : domains) {
    const std::string name = d["name"];
    const long tokens = d["tokens"], val_tokens = d["val_tokens"];
    if (d["val_loss"].is_number()) {
      std::fprintf(out, "  %-*s  %8.4f  %10.2f  %10ld  %12ld\n", width, name.c_str(),
                   d["val_loss"].get<double>(), d["perplexity"].get<double>(), tokens, val_tokens);
    } else {
      std::fprintf(out, "  %-*s  %8s  %10s  %10ld  %12ld\n", width, name.c_str(), "-", "-", tokens,
                   val_tokens);
    }
  }
}

// The summary of an eval.json as a few small tables.
void print_summary(const nlohmann::json& j, std::FILE* out) {
  const double val = j["val_loss"];
  std::fprintf(out, "run %s: validation loss %.4f, perplexity %.2f (%ld tokens)\n",
               j["run"].get<std::string>().c_str(), val, j["perplexity"].get<double>(),
               j["val_tokens"].get<long>());
  const auto& c = j["cloze"];
  std::fprintf(out, "cloze (last word, %d items): accuracy %.4f, target loss %.4f\n",
               c["items"].get<int>(), c["accuracy"].get<double>(), c["target_loss"].get<double>());
  const auto& m = j["multiple_choice"];
  std::fprintf(out, "next sentence, 4 choices (%d items): accuracy %.4f, accuracy_norm %.4f\n",
               m["items"].get<int>(), m["accuracy"].get<double>(),
               m["accuracy_norm"].get<double>());
  if (j.contains("domains")) print_domains(j["domains"], out);
  std::fprintf(out, "\nlogit lens (decode after iteration r)\n  %9s  %8s\n", "iteration", "loss");
  for (const auto& e : j["logit_lens"]) {
    std::fprintf(out, "  %9d  %8.4f\n", e["iteration"].get<int>(), e["loss"].get<double>());
  }
  std::fprintf(out, "\nloops at inference\n  %9s  %8s  %8s\n", "loops", "loss", "vs val");
  for (const auto& e : j["loop_sweep"]) {
    const double loss = e["loss"];
    std::fprintf(out, "  %9d  %8.4f  %+8.4f\n", e["loops"].get<int>(), loss, loss - val);
  }
  if (!j["adaptive"].empty()) {
    std::fprintf(out, "\nadaptive halting (per token, at most the trained loop count)\n");
    std::fprintf(out, "  %9s  %8s  %14s\n", "threshold", "loss", "avg iterations");
    for (const auto& e : j["adaptive"]) {
      std::fprintf(out, "  %9g  %8.4f  %14.3f\n", e["threshold"].get<double>(),
                   e["loss"].get<double>(), e["avg_iterations"].get<double>());
    }
  }
}

}  // namespace

void register_eval_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "eval",
      "Evaluate a run: perplexity, cloze and multiple-choice tasks, logit lens, loop sweeps");
  struct Args {
    std::string run_dir;
    eval::EvalOptions options;
    bool json = false;
    std::string dump_tasks;
    std::string device = "cpu";
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("--checkpoint", args->run_dir, "run directory holding checkpoint.bin")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--loops", args->options.loops,
                  "loop counts to evaluate besides the trained R (replaces the default sweep "
                  "1..2R of a looped model)");
  cmd->add_option("--halt-thresholds", args->options.halt_thresholds,
                  "adaptive-halting thresholds on the relative change of a token's state "
                  "(default 0.02 0.05 0.1 0.2 0.5)");
  cmd->add_option("--batches", args->options.batches, "validation batches")
      ->capture_default_str()
      ->check(kPositiveNumber);
  cmd->add_option("--max-items", args->options.max_items, "items per task")
      ->capture_default_str()
      ->check(kNonNegativeNumber);
  cmd->add_option("--threads", args->options.threads, "OpenMP threads")
      ->capture_default_str()
      ->check(kPositiveNumber);
  cmd->add_option("--data", args->options.data_dir,
                  "dataset directory (default: the run's data.dir, see docs/EVAL.md)");
  cmd->add_option("--task-seed", args->options.task_seed, "seed of the task item selection")
      ->capture_default_str();
  cmd->add_flag("--json", args->json, "print eval.json on stdout (the table goes to stderr)");
  cmd->add_option("--dump-tasks", args->dump_tasks,
                  "write the task items as JSON lines to FILE and exit (no evaluation)");
  cmd->add_option("--device", args->device, "cpu, cuda or cuda:N (a CUDA build with a GPU)")
      ->capture_default_str();
  cmd->callback([args] {
    model::use_device(args->device);  // before the model is loaded: it stays on this device
    if (!args->dump_tasks.empty()) {
      eval::TaskOptions o;
      o.max_items = args->options.max_items;
      o.seed = args->options.task_seed;
      const auto [cloze, mc] =
          eval::dump_eval_tasks(args->run_dir, o, args->options.data_dir, args->dump_tasks);
      std::printf("wrote %zu cloze and %zu multiple-choice items to %s\n", cloze, mc,
                  args->dump_tasks.c_str());
      return;
    }
    args->options.progress = true;
    const std::string text = eval::run_eval(args->run_dir, args->options);
    const nlohmann::json j = nlohmann::json::parse(text);
    if (args->json) {
      print_summary(j, stderr);
      std::fputs(text.c_str(), stdout);
    } else {
      print_summary(j, stdout);
    }
  });
}

}  // namespace loopmoe::cli
