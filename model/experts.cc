#include "model/experts.h"

#include "model/ops.h"

namespace loopmoe {

void experts_forward(float* out, ExpertBatch& b, const ExpertWeights& w, const ExpertShape& s) {
  const int D = s.d_model, F = s.hidden;
  const int E = static_cast<int>(b.offset.size()) - 1;
  const size_t rows = static_cast<size_t>(b.offset[E]);
  b.h1.resize(rows * F);
  b.h3.resize(rows * F);
  b.act.resize(rows * F);
  // Each expert runs on one thread from start to end, so results do not depend on scheduling.
#pragma omp parallel for schedule(dynamic, 1)
  for (int e = 0; e < E; ++e) {
    const int64_t r0 = b.offset[e];
    const int n = static_cast<int>(b.offset[e + 1] - r0);
    const size_t wf = static_cast<size_t>(e) * D * F;
    ops::swiglu_forward(out + r0 * D, b.h1.data() + r0 * F, b.h3.data() + r0 * F,
                        b.act.data() + r0 * F, b.x.data() + r0 * D, w.w1 + wf, w.w3 + wf, w.w2 + wf,
                        n, D, F);
  }
}

void experts_backward(float* dx, const float* dout, const ExpertBatch& b, const ExpertWeights& w,
                      const ExpertShape& s) {
  const int D = s.d_model, F = s.hidden;
  const int E = static_cast<int>(b.offset.size()) - 1;
  std::vector<float> scratch(2 * static_cast<size_t>(b.offset[E]) * F);
#pragma omp parallel for schedule(dynamic, 1)
  for (int e = 0; e < E; ++e) {
    const int64_t r0 = b.offset[e];
    const int n = static_cast<int>(b.offset[e + 1] - r0);
    const size_t wf = static_cast<size_t>(e) * D * F;
    ops::swiglu_backward(dx + r0 * D, w.dw1 + wf, w.dw3 + wf, w.dw2 + wf,
                         scratch.data() + 2 * r0 * F, dout + r0 * D, b.x.data() + r0 * D,
                         b.h1.data() + r0 * F, b.h3.data() + r0 * F, b.act.data() + r0 * F,
                         w.w1 + wf, w.w3 + wf, w.w2 + wf, n, D, F);
  }
}

}  // namespace loopmoe
