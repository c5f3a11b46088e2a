// The norm in front of every sublayer: RMSNorm with a gain (mode off) or IterAdaLN (joint, iter,
// token), which also yields the gate of the gated residual. docs/MODEL.md has the equations; this
// file is the one place they are implemented, so a variant of IterAdaLN is one change here.
#pragma once

#include <vector>

#include "model/config.h"
#include "model/param_layout.h"

namespace loopmoe {

struct NormActivations {
  std::vector<float> rstd;   // [S]
  std::vector<float> n;      // [S,D] normalised input (IterAdaLN modes)
  std::vector<float> u;      // [S,D] sublayer input
  std::vector<float> c;      // [S,dc] conditioning before SiLU
  std::vector<float> sc;     // [S,dc] SiLU(c)
  std::vector<float> m;      // [S,3D] shift | scale | gate
  std::vector<float> pe, a1, e;  // [dc] iteration encoding, MLP_iter hidden (pre-SiLU), output
};

class NormBlock {
 public:
  NormBlock(const ModelConfig& config, const NormBlockOffsets& offsets)
      : config_(config), o_(offsets) {}

  // x[S,D] → acts.u (and acts.m, the gate source, in IterAdaLN modes) at iteration r.
  void forward(NormActivations& acts, const float* params, const float* x, int r, int S) const;
  // Gate pointer for gated_residual_* (nullptr in mode off).
  const float* gate_source(const NormActivations& acts) const;
  // du[S,D] and dm[S,3D] (its gate columns already filled by the residual backward; the rest is
  // overwritten here) → dx += ..., grads += ...
  void backward(float* dx, float* grads, const float* du, float* dm, const NormActivations& acts,
                const float* params, const float* x, int S) const;

 private:
  const ModelConfig& config_;
  NormBlockOffsets o_;
};

}  // namespace loopmoe
