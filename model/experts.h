// SwiGLU experts of one MoE layer, computed grouped by expert. Used by the local dispatcher and,
// in the distributed service, by expert shards: it knows nothing about where tokens came from.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "model/buffer.h"

namespace loopmoe::model {

struct ExpertShape {
  int d_model = 0, hidden = 0;
  size_t params_per_expert() const { return 3ull * d_model * hidden; }
};

// Rows for `num_experts` experts, stored contiguously: expert e owns rows [offset[e], offset[e+1]).
// The offsets are on the device with the rows (the local dispatcher computes them there, so the
// layout never reaches the host); `rows`, on the host, bounds offset[num_experts] and sizes the
// buffers. Rows past the experts' are not used.
struct ExpertBatch {
  Buffer<int64_t> offset;     // [num_experts + 1]
  int64_t rows = 0;           // ≥ offset[num_experts]
  Buffer<float> x;            // [rows, d]
  Buffer<float> h1, h3, act;  // [rows, hidden] saved for backward
};

// Weights of expert e: w1 = w1_base + e*D*F ([D,F]), w3 likewise, w2 = w2_base + e*F*D ([F,D]).
struct ExpertWeights {
  const float* w1 = nullptr;
  const float* w3 = nullptr;
  const float* w2 = nullptr;
  float* dw1 = nullptr;
  float* dw3 = nullptr;
  float* dw2 = nullptr;
};

// out[rows, d] = expert_e(x rows) for every expert's rows.
void experts_forward(float* out, ExpertBatch& batch, const ExpertWeights& w, const ExpertShape& s);
// dx[rows, d] (overwritten) and the weight gradients (accumulated) from dout[rows, d].
void experts_backward(float* dx, const float* dout, const ExpertBatch& batch,
                      const ExpertWeights& w, const ExpertShape& s);

}  // namespace loopmoe::model
