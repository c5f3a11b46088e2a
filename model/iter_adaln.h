// The norm in front of every sublayer: RMSNorm with a gain (mode off) or IterAdaLN (joint, iter,
// token), which also yields the gate of the gated residual. docs/MODEL.md has the equations; this
// file is the one place they are implemented, so a variant of IterAdaLN is one change here.
#pragma once

#include "model/buffer.h"
#include "model/config.h"
#include "model/ops.h"
#include "model/param_layout.h"

namespace loopmoe::model {

template <typename T>
struct NormActivationsT {
  Buffer<T> rstd;       // [S]
  Buffer<T> n;          // [S,D] normalised input (IterAdaLN modes)
  Buffer<T> u;          // [S,D] sublayer input
  Buffer<T> c;          // [S,dc] conditioning before SiLU
  Buffer<T> sc;         // [S,dc] SiLU(c)
  Buffer<T> m;          // [S,3D] shift | scale | gate
  Buffer<T> pe, a1, e;  // [dc] iteration encoding, MLP_iter hidden (pre-SiLU), output
};

template <typename T>
class NormBlockT {
 public:
  NormBlockT(const ModelConfig& config, const NormBlockOffsets& offsets)
      : config_(config), o_(offsets) {}

  // x[S,D] → acts.u (and acts.m, the gate source, in IterAdaLN modes) at iteration r.
  void forward(NormActivationsT<T>& acts, const T* params, const T* x, int r, int S) const;
  // Gate pointer for gated_residual_* (nullptr in mode off).
  const T* gate_source(const NormActivationsT<T>& acts) const;
  // du[S,D] and dm[S,3D] (its gate columns already filled by the residual backward; the rest is
  // overwritten here) → dx += ..., grads += ...
  void backward(T* dx, T* grads, const T* du, T* dm, const NormActivationsT<T>& acts,
                const T* params, const T* x, int S) const;
  // The same with parameter gradients accumulated per row group (ops::GradGroups over the whole
  // parameter buffer).
  void backward(T* dx, const ops::GradGroups<T>& grads, const T* du, T* dm,
                const NormActivationsT<T>& acts, const T* params, const T* x) const;

 private:
  const ModelConfig& config_;
  NormBlockOffsets o_;
};

// Float for training; double for gradient checks.
using NormActivations = NormActivationsT<float>;
using NormBlock = NormBlockT<float>;

}  // namespace loopmoe::model
