#include "train/trainer.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>

#include "common/atomic_file.h"
#include "common/clock.h"
#include "common/loss_spike.h"
#include "dataloader/dataset_check.h"
#include "dataloader/sampler.h"
#include "dataloader/token_shard.h"
#include "model/device.h"
#include "model/error.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "model/train_step.h"
#include "train/checkpoint.h"
#include "train/format.h"

namespace loopmoe::train {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// Keeps only metric records of steps <= `step`: a resumed run rewrites what came after its
// checkpoint, so the file always describes one consistent run. A record torn by a killed run (not
// one JSON object with a step) is dropped; the file is replaced atomically, so a kill here leaves
// the old file or the new one.
void truncate_metrics(const fs::path& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return;
  std::string line, kept;
  while (std::getline(in, line)) {
    if (line.find("\"step\": ") == std::string::npos) continue;
    try {
      const auto j = nlohmann::json::parse(line);
      if (j.is_object() && j.contains("step") && j["step"].is_number_integer() &&
          j["step"].get<int64_t>() <= step) {
        kept += line + "\n";
      }
    } catch (const nlohmann::json::exception&) {
      // torn by a kill: dropped
    }
  }
  in.close();
  common::write_file_atomically(path, kept);
}

// More rollbacks than this in one invocation stop the run (shared with the job driver).
using common::kMaxRollbacks;

}  // namespace

double recorded_validation_loss(const std::string& run_dir) {
  std::ifstream in(fs::path(run_dir) / "metrics.jsonl");
  std::string line;
  double last = std::nan("");
  while (std::getline(in, line)) {
    if (line.find("\"val_loss\"") == std::string::npos) continue;
    try {
      const auto j = nlohmann::json::parse(line);
      if (j.contains("val_loss") && j["val_loss"].is_number()) last = j["val_loss"].get<double>();
    } catch (const nlohmann::json::exception&) {
      // A torn last line of an interrupted run: ignore it, the resumed run rewrites it.
    }
  }
  return last;
}

double validation_loss(model::Model& model, const dataloader::TokenShard& val, int batch,
                       int seq_len, int batches) {
  dataloader::BatchSampler sampler(val, batch, seq_len, 0, dataloader::WindowOrder::kSpread);
  std::vector<int32_t> in(static_cast<size_t>(batch) * seq_len), tg(in.size());
  double total = 0;
  for (int i = 0; i < batches; ++i) {
    sampler.next(in.data(), tg.data());
    total += model.forward(in.data(), tg.data(), batch, seq_len).ce;
  }
  return total / batches;
}

int64_t first_validation_step(const model::TrainConfig& train, int64_t start, int64_t end) {
  int64_t first = 0;
  if (train.eval_interval > 0) {
    const int64_t next = (start / train.eval_interval + 1) * train.eval_interval;
    if (next <= end) first = next;
  }
  if (start < end && end == train.steps && first == 0) first = train.steps;
  return first;
}

TrainResult run_training(const model::Config& requested, const TrainOptions& opt) {
  // The run records an absolute data directory, so audit and eval find the data from any
  // working directory (and a resume from another directory still matches).
  model::Config cfg = requested;
  cfg.data.dir = fs::absolute(cfg.data.dir).lexically_normal().string();
  model::set_num_threads(opt.threads);
  // train.precision for every product of this run, validation included (process-wide: ops.h
  // MatmulPrecision); the previous setting comes back when the run returns or throws.
  const model::ops::MatmulPrecisionScope precision(
      model::ops::parse_matmul_precision(cfg.train.precision));
  const model::TrainConfig& tc = cfg.train;
  const int B = tc.batch_size, T = cfg.model.seq_len;
  const fs::path data_dir(cfg.data.dir);
  const fs::path ckpt = fs::path(opt.out_dir) / "checkpoint.bin";
  const fs::path metrics_path = fs::path(opt.out_dir) / "metrics.jsonl";
  const int end = opt.stop_after >= 0 ? std::min(tc.steps, opt.stop_after) : tc.steps;

  // Vet every input this run will read before writing or computing anything (docs/DATA.md
  // "Checking a dataset before a run"): from the shard headers, at once, so a bad dataset fails
  // here instead of at the first validation, after the training work. val.bin is read only when
  // the steps this invocation runs include a validation.
  const int64_t first_step = opt.resume ? read_checkpoint_step(ckpt.string()) : 0;
  if (opt.resume && first_step >= tc.steps) {
    // A finished run: nothing to train, validate or write, and no data to read. The checkpoint
    // is still loaded, so a different config is refused as on any resume.
    model::Model model(cfg.model);
    model::AdamW adam(model.layout(), tc);
    load_checkpoint(ckpt.string(), cfg, model, adam);
    TrainResult result;
    result.already_complete = true;
    result.first_step = static_cast<int>(first_step);
    result.final_val_loss = recorded_validation_loss(opt.out_dir);
    return result;
  }
  const int64_t first_eval = first_validation_step(tc, first_step, end);
  dataloader::DatasetNeeds needs;
  needs.max_vocab = static_cast<uint32_t>(cfg.model.vocab_size);
  needs.seq_len = T;
  needs.val = first_eval > 0;
  needs.val_why =
      first_eval == tc.steps && (tc.eval_interval == 0 || first_eval % tc.eval_interval != 0)
          ? "the run validates after its last step (train.steps = " + std::to_string(tc.steps) + ")"
          : "the run validates every train.eval_interval = " + std::to_string(tc.eval_interval) +
                " steps, first after step " + std::to_string(first_eval);
  dataloader::check_dataset(data_dir, needs);
  dataloader::TokenShard train_shard = dataloader::TokenShard::open(data_dir / "train.bin");
  std::optional<dataloader::TokenShard> val_shard;
  if (needs.val) val_shard.emplace(dataloader::TokenShard::open(data_dir / "val.bin"));
  fs::create_directories(opt.out_dir);

  model::Model model(cfg.model);
  model.set_grad_groups(tc.grad_groups);
  model::AdamW adam(model.layout(), tc);
  dataloader::BatchSampler sampler(train_shard, B, T, tc.seed, /*shuffle=*/true);
  int64_t start = 0;
  if (opt.resume) {
    TrainProgress p = load_checkpoint(ckpt.string(), cfg, model, adam);
    if (p.step != first_step) {
      throw model::CheckpointError(ckpt.string() + ": changed while the run started (step " +
                                   std::to_string(first_step) + ", then " + std::to_string(p.step) +
                                   ")");
    }
    sampler.restore(p.sampler);
    start = p.step;
    truncate_metrics(metrics_path, start);
    if (p.threads != opt.threads) {
      std::fprintf(stderr,
                   "warning: checkpoint was written with %d threads, resuming with %d: the loss "
                   "curve will not be bit-identical to an uninterrupted run\n",
                   p.threads, opt.threads);
    }
    if (opt.progress) std::fprintf(stderr, "resumed from %s at step %ld\n", ckpt.c_str(), start);
  } else {
    if (fs::exists(ckpt)) {
      throw model::ConfigError(ckpt.string() +
                               " exists: pass --resume to continue it, or choose another --out");
    }
    model.init_params(tc.seed);
    std::ofstream(metrics_path, std::ios::trunc);
    common::write_file_atomically(fs::path(opt.out_dir) / "config.toml", model::to_toml(cfg));
  }
  std::ofstream metrics(metrics_path, std::ios::app);
  metrics.precision(8);
  // The state a rollback returns to when no checkpoint is written yet: the run's start (only a
  // fresh run lacks a checkpoint, so this is step 0).
  const dataloader::SamplerState initial_sampler = sampler.state();

  const bool tty = isatty(STDERR_FILENO);
  if (opt.progress) {
    // The precision is named when it is not the default (fp32 runs print the line they always did).
    const std::string precision_note =
        model::precision_is_default(tc)
            ? ""
            : ", " + tc.precision + " matmuls (fp32 accumulation, weights and optimizer)";
    std::fprintf(stderr, "model: %s, %zu parameters, %d×%d layers, %d experts top-%d, on %s%s\n",
                 cfg.model.adaln() ? "LoopMoE" : (cfg.model.n_loops > 1 ? "looped MoE" : "MoE"),
                 model.num_params(), cfg.model.n_layers, cfg.model.n_loops, cfg.model.n_experts,
                 cfg.model.top_k, model::to_string(model.device()), precision_note.c_str());
    if (val_shard) {
      std::fprintf(stderr, "data: %lu train tokens, %lu validation tokens; %d tokens per step\n",
                   static_cast<unsigned long>(train_shard.num_tokens()),
                   static_cast<unsigned long>(val_shard->num_tokens()), B * T);
    } else {
      std::fprintf(stderr,
                   "data: %lu train tokens, no validation in these steps; %d tokens per step\n",
                   static_cast<unsigned long>(train_shard.num_tokens()), B * T);
    }
  }
  std::vector<int32_t> in(static_cast<size_t>(B) * T), tg(in.size());
  int64_t current_step = 0;  // for the before_finish test hook
  TrainResult result;
  result.first_step = static_cast<int>(start);
  double train_seconds = 0, window_seconds = 0;
  int64_t window_tokens = 0;
  const auto save = [&](int64_t steps_done) {
    save_checkpoint(ckpt.string(), cfg, model, adam, {steps_done, sampler.state(), opt.threads});
  };
  model::FinishGradients finish_gradients = model::clip_locally(model.num_params(), tc.grad_clip);
  if (opt.before_finish) {
    finish_gradients = [&, clip = std::move(finish_gradients)](float* g, bool loss_finite) {
      opt.before_finish(current_step, g);
      return clip(g, loss_finite);
    };
  }
  // The numerics guard (train.nonfinite, train.loss_spike_*; docs/CONFIG.md). A non-finite step
  // never reaches AdamW (model::train_step), so finite steps run exactly as without the guard.
  common::LossSpikeCheck spikes(tc.loss_spike_factor, tc.loss_spike_window);
  std::set<int64_t> dropped_on_replay;  // rollback: steps whose batch a replay drops
  // Back to the last checkpoint (or the run's start): parameters, AdamW, sampler, metrics file.
  const auto roll_back = [&](int64_t failed_step) -> int64_t {
    int64_t to = 0;
    if (fs::exists(ckpt)) {
      const TrainProgress p = load_checkpoint(ckpt.string(), cfg, model, adam);
      sampler.restore(p.sampler);
      to = p.step;
    } else {
      model.init_params(tc.seed);
      adam.m_buffer().zero_all();  // on the model's device (m() is the CPU's host view)
      adam.v_buffer().zero_all();
      adam.set_steps_taken(0);
      sampler.restore(initial_sampler);
    }
    metrics.close();
    truncate_metrics(metrics_path, to);
    metrics.open(metrics_path, std::ios::app);
    result.losses.resize(static_cast<size_t>(std::max<int64_t>(0, to - start)));
    spikes.clear();
    dropped_on_replay.insert(failed_step);
    return to;
  };
  for (int step = static_cast<int>(start); step < end; ++step) {
    current_step = step;
    const auto t0 = Clock::now();
    sampler.next(in.data(), tg.data());
    model::StepOutcome outcome;
    if (dropped_on_replay.count(step)) {
      // A replay after a rollback drops the batch that failed: as a skipped step.
      outcome.nonfinite = true;
      outcome.loss.total = std::nan("");
      outcome.grad_norm = std::nan("");
      outcome.lr = model::learning_rate(tc, step);
    } else {
      outcome =
          model::train_step(model, adam, tc, step, {in.data(), tg.data(), B, T}, finish_gradients);
    }
    const model::LossParts& loss = outcome.loss;
    const double norm = outcome.grad_norm, lr = outcome.lr;
    const double dt = common::seconds_since(t0);
    train_seconds += dt;
    window_seconds += dt;
    window_tokens += static_cast<int64_t>(B) * T;
    result.losses.push_back(loss.total);
    const int done = step + 1;
    if (outcome.nonfinite) {
      const std::string what =
          !std::isfinite(loss.total)
              ? "loss became " + std::to_string(loss.total) + " at step " + std::to_string(done)
              : "gradient norm became " + std::to_string(norm) + " at step " + std::to_string(done);
      const bool replay_drop = dropped_on_replay.count(step) > 0;
      if (tc.nonfinite == "stop") {
        throw std::runtime_error(what + "; last checkpoint: " + ckpt.string());
      }
      if (tc.nonfinite == "rollback" && !replay_drop) {
        if (result.rollbacks == kMaxRollbacks) {
          throw std::runtime_error(
              what + " after " + std::to_string(kMaxRollbacks) +
              " rollbacks (train.nonfinite = \"rollback\"); last checkpoint: " + ckpt.string());
        }
        ++result.rollbacks;
        const int64_t to = roll_back(step);
        std::fprintf(stderr, "%swarning: %s; rolled back to step %ld (rollback %d)\n",
                     tty && opt.progress ? "\n" : "", what.c_str(), static_cast<long>(to),
                     result.rollbacks);
        step = static_cast<int>(to) - 1;  // the loop's ++step resumes at `to`
        continue;
      }
      ++result.skipped_steps;
      std::fprintf(
          stderr, "%swarning: %s; step skipped (%d so far)\n", tty && opt.progress ? "\n" : "",
          replay_drop
              ? ("step " + std::to_string(done) + " dropped on the replay after a rollback").c_str()
              : what.c_str(),
          result.skipped_steps);
      metrics << "{\"step\": " << done << ", \"skipped_step\": true, \"lr\": " << lr
              << ", \"skipped\": " << result.skipped_steps << "}\n";
      metrics.flush();
    } else if (const std::optional<double> med = spikes.observe(loss.total)) {
      ++result.loss_spikes;
      char text[160];
      std::snprintf(text, sizeof text, "loss spike at step %d: %.6g > %g x the running median %.6g",
                    done, loss.total, tc.loss_spike_factor, *med);
      if (tc.loss_spike_action == "stop") {
        throw std::runtime_error(
            std::string(text) +
            " (train.loss_spike_action = \"stop\"); last checkpoint: " + ckpt.string());
      }
      std::fprintf(stderr, "%swarning: %s\n", tty && opt.progress ? "\n" : "", text);
    }
    const bool log_now = !outcome.nonfinite && (done % tc.log_interval == 0 || done == end);
    if (log_now) {
      const double tps = window_tokens / std::max(window_seconds, 1e-9);
      metrics << "{\"step\": " << done << ", \"loss\": " << loss.total << ", \"ce\": " << loss.ce
              << ", \"aux\": " << loss.aux << ", \"z\": " << loss.z
              << ", \"dropped\": " << loss.dropped << ", \"lr\": " << lr
              << ", \"grad_norm\": " << norm << ", \"tokens_per_s\": " << tps;
      // Only runs the guard acted in carry these, so other runs' records are as they were.
      if (result.skipped_steps > 0) metrics << ", \"skipped\": " << result.skipped_steps;
      if (result.loss_spikes > 0) metrics << ", \"spikes\": " << result.loss_spikes;
      metrics << "}\n";
      metrics.flush();
      if (opt.progress) {
        const double eta = (end - done) * (train_seconds / (done - start));
        const int width = 24, filled = static_cast<int>(width * done / std::max(1, tc.steps));
        std::string bar = std::string(filled, '=') + std::string(width - filled, ' ');
        std::string guard =
            result.skipped_steps > 0 ? " | skipped " + std::to_string(result.skipped_steps) : "";
        // The device and, on a GPU, its peak memory (on the CPU: nothing, the line as before).
        if (model.device() != model::Device::kCpu) guard += " | " + model::device_summary();
        std::fprintf(stderr, "%sstep %d/%d [%s] loss %.4f | %.0f tok/s%s | ETA %s%s",
                     tty ? "\r" : "", done, tc.steps, bar.c_str(), loss.total, tps, guard.c_str(),
                     format_seconds(eta).c_str(), tty ? "   " : "\n");
      }
      window_seconds = 0;
      window_tokens = 0;
    }
    const bool eval_now =
        (tc.eval_interval > 0 && done % tc.eval_interval == 0) || done == tc.steps;
    if (eval_now) {
      result.final_val_loss = validation_loss(model, *val_shard, B, T, tc.eval_batches);
      metrics << "{\"step\": " << done << ", \"val_loss\": " << result.final_val_loss << "}\n";
      metrics.flush();
      if (opt.progress) {
        std::fprintf(stderr, "%sstep %d: validation loss %.4f (perplexity %.1f)\n", tty ? "\n" : "",
                     done, result.final_val_loss, std::exp(result.final_val_loss));
      }
    }
    if ((tc.checkpoint_interval > 0 && done % tc.checkpoint_interval == 0) || done == end) {
      save(done);
    }
  }
  result.steps_done = end - static_cast<int>(start);
  result.tokens_per_s =
      result.steps_done * static_cast<double>(B) * T / std::max(train_seconds, 1e-9);
  if (opt.progress) {
    std::fprintf(stderr, "%sdone: %d steps, %.0f tok/s, checkpoint %s\n", tty ? "\n" : "",
                 result.steps_done, result.tokens_per_s, ckpt.c_str());
  }
  return result;
}

}  // namespace loopmoe::train
