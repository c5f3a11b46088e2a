// `loopmoe compare RUN...`: a side-by-side table of finished runs from their metrics.jsonl.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "cli/commands.h"
#include "model/config.h"
#include "model/param_layout.h"

namespace loopmoe::cli {
namespace {

namespace fs = std::filesystem;

// Value of a numeric field in one JSON-lines record written by the trainer; NaN when absent.
double field(const std::string& line, const std::string& key) {
  const std::string needle = "\"" + key + "\": ";
  const auto pos = line.find(needle);
  if (pos == std::string::npos) return std::nan("");
  return std::stod(line.substr(pos + needle.size()));
}

struct RunSummary {
  std::string name, model;
  size_t params = 0;
  int steps = 0;
  double loss = NAN, val_loss = NAN, tokens_per_s = 0;
};

RunSummary summarise(const fs::path& dir) {
  RunSummary r;
  r.name = dir.filename().string();
  if (r.name.empty()) r.name = dir.parent_path().filename().string();
  const model::Config cfg = model::load_config((dir / "config.toml").string());
  r.params = model::ParamLayout(cfg.model).size();
  r.model = std::to_string(cfg.model.n_layers) + "x" + std::to_string(cfg.model.n_loops) + " E" +
            std::to_string(cfg.model.n_experts) + " " + to_string(cfg.model.iter_adaln);
  std::ifstream in(dir / "metrics.jsonl");
  if (!in) throw std::runtime_error((dir / "metrics.jsonl").string() + ": cannot open");
  std::string line;
  double tps_sum = 0;
  int tps_n = 0;
  while (std::getline(in, line)) {
    const double v = field(line, "val_loss");
    if (!std::isnan(v)) {
      r.val_loss = v;
      continue;
    }
    r.steps = static_cast<int>(field(line, "step"));
    r.loss = field(line, "loss");
    tps_sum += field(line, "tokens_per_s");
    ++tps_n;
  }
  r.tokens_per_s = tps_n ? tps_sum / tps_n : 0;
  return r;
}

}  // namespace

void register_compare_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("compare", "Side-by-side summary of training runs");
  auto runs = std::make_shared<std::vector<std::string>>();
  cmd->add_option("runs", *runs, "run directories (written by loopmoe train --out)")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->callback([runs] {
    std::printf("%-20s %-20s %10s %6s %10s %9s %9s %9s\n", "run", "model", "params", "steps",
                "train loss", "val loss", "val ppl", "tok/s");
    for (const std::string& d : *runs) {
      RunSummary r = summarise(d);
      std::printf("%-20s %-20s %10zu %6d %10.4f %9.4f %9.1f %9.0f\n", r.name.c_str(),
                  r.model.c_str(), r.params, r.steps, r.loss, r.val_loss, std::exp(r.val_loss),
                  r.tokens_per_s);
    }
  });
}

}  // namespace loopmoe::cli
