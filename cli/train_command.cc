#include <cmath>
#include <cstdio>

#include "cli/commands.h"
#include "model/config.h"
#include "model/device.h"
#include "train/trainer.h"

namespace loopmoe::cli {

void register_train_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("train", "Train a model on one machine");
  struct Args {
    std::string config;
    int steps = -1;
    train::TrainOptions options;
    std::string data_dir;
    std::string device = "cpu";
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("--config", args->config, "model and training config (TOML)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--steps", args->steps, "override train.steps (the schedule length)");
  cmd->add_option("--out", args->options.out_dir, "run directory: checkpoint, metrics, config")
      ->capture_default_str();
  cmd->add_option("--data", args->data_dir, "override data.dir (holds train.bin and val.bin)");
  cmd->add_flag("--resume", args->options.resume, "continue from OUT/checkpoint.bin");
  cmd->add_option("--threads", args->options.threads, "OpenMP threads")->capture_default_str();
  cmd->add_option("--stop-after", args->options.stop_after,
                  "stop after this many steps (checkpointed), keeping the schedule of --steps");
  cmd->add_flag("!--no-progress", args->options.progress, "no progress output");
  cmd->add_option("--device", args->device, "cpu, cuda or cuda:N (a CUDA build with a GPU)")
      ->capture_default_str();
  cmd->callback([args] {
    model::Config cfg = model::load_config(args->config);
    if (args->steps > 0) {
      cfg.train.steps = args->steps;
      if (cfg.train.warmup_steps > cfg.train.steps) {
        cfg.train.warmup_steps = cfg.train.steps / 10;
        std::fprintf(stderr,
                     "note: --steps %d is shorter than the configured warmup; warmup is %d\n",
                     cfg.train.steps, cfg.train.warmup_steps);
      }
    }
    if (!args->data_dir.empty()) cfg.data.dir = args->data_dir;
    model::validate(cfg);
    model::use_device(args->device);  // before the model is built: it stays on this device
    train::TrainResult r = train::run_training(cfg, args->options);
    if (r.already_complete) {
      std::printf("run already complete at step %d", r.first_step);
      if (!std::isnan(r.final_val_loss)) {
        std::printf("; last validation loss %.4f", r.final_val_loss);
      }
      std::printf("\n");
      return;
    }
    std::printf("final validation loss %.4f, %.0f tokens/s\n", r.final_val_loss, r.tokens_per_s);
  });
}

}  // namespace loopmoe::cli
