// Single-process training loop: sampler → forward/backward → clip → AdamW, with validation,
// JSON-lines metrics, progress output and resumable checkpoints.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/config.h"

namespace loopmoe::model {
class Model;
}  // namespace loopmoe::model
namespace loopmoe::dataloader {
class TokenShard;
}  // namespace loopmoe::dataloader

namespace loopmoe::train {

struct TrainOptions {
  std::string out_dir = "runs/default";
  bool resume = false;  // continue from out_dir/checkpoint.bin
  int threads = 1;
  int stop_after = -1;   // stop (after checkpointing) once this many steps are done; -1: never
  bool progress = true;  // progress output on stderr
  // Test hook (tests/test_numerics_guard.cc): called with the 0-based step and the whole gradient
  // buffer after backward, before the gradient norm, e.g. to poison one gradient with NaN.
  std::function<void(int64_t step, float* grads)> before_finish;
};

struct TrainResult {
  std::vector<double> losses;  // total loss of every step run in this invocation
  int first_step = 0;          // 0-based step of losses[0]
  double final_val_loss = 0;   // when already_complete: the last recorded one (NaN if none)
  double tokens_per_s = 0;
  int steps_done = 0;
  // Resumed from a checkpoint already at train.steps: nothing was run, read or written.
  bool already_complete = false;
  // The numerics guard in this invocation (train.nonfinite, train.loss_spike_*): steps dropped
  // (skipped, or dropped on a replay after a rollback), rollbacks and loss spikes flagged.
  int skipped_steps = 0;
  int rollbacks = 0;
  int loss_spikes = 0;
};

// Checks every input first (data.dir's shards against model.vocab_size and seq_len, val.bin only
// when a validation falls in the steps to run; see first_validation_step), so bad data fails
// before any output is written; then trains. Throws dataloader::DataError, ConfigError or
// CheckpointError with one clear message (common::FileError when the run's config.toml cannot be
// written). Resuming a run whose checkpoint is already at train.steps loads the checkpoint (so a
// different config is still refused) and returns with already_complete set, writing nothing.
TrainResult run_training(const model::Config& config, const TrainOptions& options);

// The first step in (start, end] after which a run of this schedule validates, or 0 when none
// does. Validation follows every multiple of train.eval_interval (when > 0) and step train.steps
// (the end of the schedule, even with eval_interval = 0); `start` is the steps already done,
// `end` where this invocation stops (train.steps, or earlier with --stop-after). A run that
// validates nowhere does not read val.bin.
int64_t first_validation_step(const model::TrainConfig& train, int64_t start, int64_t end);

// The last validation loss recorded in RUN/metrics.jsonl (its last `val_loss` record), or NaN when
// there is none (or no file). A torn line is skipped.
double recorded_validation_loss(const std::string& run_dir);

// Mean cross-entropy over `batches` sequential validation batches from the start of the shard.
double validation_loss(model::Model& model, const dataloader::TokenShard& val, int batch,
                       int seq_len, int batches);

}  // namespace loopmoe::train
