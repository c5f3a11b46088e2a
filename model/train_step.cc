#include "model/train_step.h"

namespace loopmoe::model {

FinishGradients clip_locally(size_t num_params, double max_norm) {
  return
      [num_params, max_norm](float* grads) { return clip_grad_norm(grads, num_params, max_norm); };
}

StepOutcome train_step(Model& model, AdamW& adam, const TrainConfig& train, int64_t step,
                       const StepBatch& batch, const FinishGradients& finish,
                       const std::vector<std::pair<size_t, size_t>>* ranges) {
  StepOutcome out;
  model.zero_grad();
  out.loss = model.forward(batch.tokens, batch.targets, batch.batch, batch.seq_len, batch.loops);
  model.backward();
  out.grad_norm = finish(model.grads());
  out.lr = learning_rate(train, static_cast<int>(step));
  if (ranges != nullptr) {
    adam.step(model.params(), model.grads(), out.lr, *ranges);
  } else {
    adam.step(model.params(), model.grads(), out.lr);
  }
  return out;
}

}  // namespace loopmoe::model
