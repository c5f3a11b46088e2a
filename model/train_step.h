// One training step, the sequence every trainer runs: zero_grad → forward → backward → finish the
// gradients (reduce and clip) → learning rate → AdamW. One function, so the single-process
// trainer (train/trainer.cc) and a data-parallel worker of the distributed service
// (worker/worker_runtime.cc) cannot drift apart: they differ only in how the gradients are
// finished.
#pragma once

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "model/config.h"
#include "model/model.h"
#include "model/optimizer.h"

namespace loopmoe::model {

// The batch of one step: tokens and targets [batch * seq_len].
struct StepBatch {
  const int32_t* tokens = nullptr;
  const int32_t* targets = nullptr;
  int batch = 0;
  int seq_len = 0;
  int loops = -1;  // < 0: the configured R
};

struct StepOutcome {
  LossParts loss;        // of this process's rows
  double grad_norm = 0;  // before clipping
  double lr = 0;         // the learning rate applied
  // The numerics guard: the loss or the gradient norm was NaN or Inf, so AdamW was not called
  // (parameters and AdamW state are as before the step); the caller applies train.nonfinite.
  bool nonfinite = false;
};

// Turns the step's accumulated gradients (the model's whole gradient buffer) into the update's
// and returns the gradient norm before clipping. The single process clips its own buffer
// (clip_locally); a worker first combines its replica gradients with the other workers' and
// clips by the norm over every process. `loss_finite`: whether this process's loss is finite; a
// distributed finish folds a non-finite loss into the norm it reduces (as NaN), so that every
// process of the step sees a non-finite norm and skips alike.
using FinishGradients = std::function<double(float* grads, bool loss_finite)>;

// The single process's finish: clip_grad_norm over the whole buffer with train.grad_clip.
FinishGradients clip_locally(size_t num_params, double max_norm);

// Runs step `step` (0-based: the learning-rate schedule's index). A step whose loss or gradient
// norm is not finite returns with `nonfinite` set before AdamW; finite steps run unchanged.
// `ranges`: the [offset, length) parameter ranges AdamW updates (a worker's replica); nullptr: the
// whole buffer.
StepOutcome train_step(Model& model, AdamW& adam, const TrainConfig& train, int64_t step,
                       const StepBatch& batch, const FinishGradients& finish,
                       const std::vector<std::pair<size_t, size_t>>* ranges = nullptr);

}  // namespace loopmoe::model
