// The experts of one MoE layer on a batch grouped by expert: buffers, then the grouped SwiGLU
// kernels of ops.h.
#include "model/experts.h"

#include "model/ops.h"

namespace loopmoe::model {

void experts_forward(float* out, ExpertBatch& b, const ExpertWeights& w, const ExpertShape& s) {
  const int D = s.d_model, F = s.hidden;
  const int E = static_cast<int>(b.offset.size()) - 1;
  const size_t rows = static_cast<size_t>(b.rows);
  b.h1.resize(rows * F);
  b.h3.resize(rows * F);
  b.act.resize(rows * F);
  ops::experts_swiglu_forward(out, b.h1.data(), b.h3.data(), b.act.data(), b.x.data(),
                              b.offset.data(), E, b.rows, w.w1, w.w3, w.w2, D, F);
}

void experts_backward(float* dx, const float* dout, const ExpertBatch& b, const ExpertWeights& w,
                      const ExpertShape& s) {
  const int D = s.d_model, F = s.hidden;
  const int E = static_cast<int>(b.offset.size()) - 1;
  Buffer<float> scratch(2 * static_cast<size_t>(b.rows) * F);
  ops::experts_swiglu_backward(dx, w.dw1, w.dw3, w.dw2, scratch.data(), dout, b.x.data(),
                               b.h1.data(), b.h3.data(), b.act.data(), b.offset.data(), E, b.rows,
                               w.w1, w.w3, w.w2, D, F);
}

}  // namespace loopmoe::model
