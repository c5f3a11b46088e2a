#include "model/train_step.h"

#include <cmath>

namespace loopmoe::model {

FinishGradients clip_locally(size_t num_params, double max_norm) {
  return [num_params, max_norm](float* grads, bool /*loss_finite: train_step checks the loss*/) {
    return clip_grad_norm(grads, num_params, max_norm);
  };
}

StepOutcome train_step(Model& model, AdamW& adam, const TrainConfig& train, int64_t step,
                       const StepBatch& batch, const FinishGradients& finish,
                       const std::vector<std::pair<size_t, size_t>>* ranges) {
  StepOutcome out;
  model.zero_grad();
  out.loss = model.forward(batch.tokens, batch.targets, batch.batch, batch.seq_len, batch.loops);
  model.backward();
  out.grad_norm = finish(model.grads(), std::isfinite(out.loss.total));
  out.lr = learning_rate(train, static_cast<int>(step));
  // The numerics guard: nothing non-finite reaches AdamW (clip_grad_norm leaves a NaN norm's
  // gradients unscaled). A pure check, so finite steps keep their bits.
  if (!std::isfinite(out.grad_norm) || !std::isfinite(out.loss.total)) {
    out.nonfinite = true;
    return out;
  }
  if (ranges != nullptr) {
    adam.step(model.params(), model.grads(), out.lr, *ranges);
  } else {
    adam.step(model.params(), model.grads(), out.lr);
  }
  return out;
}

}  // namespace loopmoe::model
