// Single-process training loop: sampler → forward/backward → clip → AdamW, with validation,
// JSON-lines metrics, progress output and resumable checkpoints.
#pragma once

#include <string>
#include <vector>

#include "model/config.h"

namespace loopmoe {

struct TrainOptions {
  std::string out_dir = "runs/default";
  bool resume = false;  // continue from out_dir/checkpoint.bin
  int threads = 1;
  int stop_after = -1;   // stop (after checkpointing) once this many steps are done; -1: never
  bool progress = true;  // progress output on stderr
};

struct TrainResult {
  std::vector<double> losses;  // total loss of every step run in this invocation
  int first_step = 0;          // 0-based step of losses[0]
  double final_val_loss = 0;
  double tokens_per_s = 0;
  int steps_done = 0;
};

TrainResult train(const Config& config, const TrainOptions& options);

// Mean cross-entropy over `batches` sequential validation batches from the start of the shard.
class Model;
namespace data {
class TokenShard;
}
double validation_loss(Model& model, const data::TokenShard& val, int batch, int seq_len,
                       int batches);

}  // namespace loopmoe
