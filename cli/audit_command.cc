#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "eval/audit.h"
#include "model/device.h"

namespace loopmoe::cli {

void register_audit_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "audit", "Measured FLOPs per token and routing statistics of a trained run");
  struct Args {
    std::string dir;
    eval::AuditOptions options;
    std::string device = "cpu";
    bool json = false;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("--checkpoint", args->dir, "run directory (holds checkpoint.bin)")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--batches", args->options.batches, "validation batches")->capture_default_str();
  cmd->add_option("--threads", args->options.threads, "OpenMP threads")->capture_default_str();
  cmd->add_option("--device", args->device,
                  "cpu, cuda or cuda:N (a CUDA build with a GPU); the FLOP counts are the same")
      ->capture_default_str();
  cmd->add_flag("--json", args->json, "print the JSON written to RUN/audit.json");
  cmd->callback([args] {
    model::use_device(args->device);  // before the model is loaded: it stays on this device
    const std::string text = eval::run_audit(args->dir, args->options);
    if (args->json) {
      std::printf("%s\n", text.c_str());
      return;
    }
    const auto j = nlohmann::json::parse(text);
    const auto& f = j["flops_per_token"];
    std::printf("tokens audited: %ld\n", j["tokens"].get<long>());
    std::printf("forward FLOPs/token: measured %.0f, analytic %.0f (%+.3f%%)\n",
                f["measured"].get<double>(), f["analytic"].get<double>(),
                100 * f["relative_diff"].get<double>());
    const auto& t = j["flops_per_token_train"];
    std::printf("training FLOPs/token: measured %.0f, analytic %.0f (%+.3f%%)\n",
                t["measured"].get<double>(), t["analytic"].get<double>(),
                100 * t["relative_diff"].get<double>());
    for (const auto& [kind, v] : f["by_kind"].items()) {
      std::printf("  %-18s %12.0f\n", kind.c_str(), v.get<double>());
    }
    std::printf("attention : FFN FLOP ratio %.4f; dropped tokens %ld\n",
                j["attn_ffn_flop_ratio"].get<double>(), j["dropped"].get<long>());
    std::printf("\n%5s %9s %8s %8s %9s %8s %9s %8s\n", "layer", "iteration", "min", "max", "mean",
                "std", "overload", "dropped");
    for (const auto& r : j["routing"]) {
      std::printf("%5d %9d %8ld %8ld %9.1f %8.1f %9.3f %8ld\n", r["layer"].get<int>(),
                  r["iteration"].get<int>(), r["min"].get<long>(), r["max"].get<long>(),
                  r["mean"].get<double>(), r["std"].get<double>(), r["overload"].get<double>(),
                  r["dropped"].get<long>());
    }
    std::printf("\ndistinct experts visited per token across iterations:\n");
    for (const auto& d : j["distinct_experts"]) {
      std::printf("  layer %d: %.3f (max %d)\n", d["layer"].get<int>(), d["mean"].get<double>(),
                  d["max_possible"].get<int>());
    }
  });
}

}  // namespace loopmoe::cli
