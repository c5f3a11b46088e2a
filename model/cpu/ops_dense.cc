// ops.h on the CPU, part 2: the row kernels of the dense path (embedding, RMSNorm, matmul with
// bias, SiLU, IterAdaLN modulation, gated residual, rotary embedding) and the gradient groups'
// fixed pairwise tree. Every row's result reads nothing of other rows (batch-invariant).
#include <algorithm>
#include <cmath>
#include <vector>

#include "model/cpu/kernel_util.h"
#include "model/cpu/ops_cpu.h"

namespace loopmoe::model::ops::cpu {

template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* wte, int S, int D) {
#pragma omp parallel for schedule(static)
  for (int s = 0; s < S; ++s) {
    std::copy_n(wte + static_cast<size_t>(tokens[s]) * D, D, out + static_cast<size_t>(s) * D);
  }
}

template <typename T>
void embedding_backward(T* dwte, const T* dout, const int32_t* tokens, int S, int D) {
  // Serial in token order: repeated tokens accumulate in a fixed order (bit-reproducible).
  for (int s = 0; s < S; ++s) {
    T* row = dwte + static_cast<size_t>(tokens[s]) * D;
    const T* g = dout + static_cast<size_t>(s) * D;
    for (int i = 0; i < D; ++i) row[i] += g[i];
  }
}

template <typename T>
void embedding_backward(const GradGroups<T>& dwte, const T* dout, const int32_t* tokens, int D) {
  for (int g = 0; g < dwte.groups; ++g) {
    const int r0 = dwte.row_begin(g);
    embedding_backward(dwte.at(g), dout + static_cast<size_t>(r0) * D, tokens + r0,
                       dwte.row_end(g) - r0, D);
  }
}

template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int S, int D) {
#pragma omp parallel for schedule(static)
  for (int s = 0; s < S; ++s) {
    const T* x = inp + static_cast<size_t>(s) * D;
    T* y = out + static_cast<size_t>(s) * D;
    T ss = 0;
    for (int i = 0; i < D; ++i) ss += x[i] * x[i];
    T r = T(1) / std::sqrt(ss / D + T(1e-5));
    rstd[s] = r;
    if (weight != nullptr) {
      for (int i = 0; i < D; ++i) y[i] = x[i] * r * weight[i];
    } else {
      for (int i = 0; i < D; ++i) y[i] = x[i] * r;
    }
  }
}

template <typename T>
void rmsnorm_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight,
                      const T* rstd, int S, int D) {
#pragma omp parallel for schedule(static)
  for (int s = 0; s < S; ++s) {
    const T* x = inp + static_cast<size_t>(s) * D;
    const T* g = dout + static_cast<size_t>(s) * D;
    T* dx = dinp + static_cast<size_t>(s) * D;
    const T r = rstd[s];
    // With n = x*r and dn = g*w: dx = r * (dn - n * mean(dn ⊙ n)).
    T dot = 0;
    for (int i = 0; i < D; ++i) dot += g[i] * (weight ? weight[i] : T(1)) * x[i] * r;
    dot /= D;
    for (int i = 0; i < D; ++i) {
      T dn = g[i] * (weight ? weight[i] : T(1));
      dx[i] += r * (dn - x[i] * r * dot);
    }
  }
  if (dweight != nullptr) {
    for (int s = 0; s < S; ++s) {
      const T* x = inp + static_cast<size_t>(s) * D;
      const T* g = dout + static_cast<size_t>(s) * D;
      for (int i = 0; i < D; ++i) dweight[i] += g[i] * x[i] * rstd[s];
    }
  }
}

template <typename T>
void rmsnorm_weight_backward(const GradGroups<T>& dweight, const T* dout, const T* inp,
                             const T* rstd, int D) {
  for (int g = 0; g < dweight.groups; ++g) {
    T* dw = dweight.at(g);
    for (int s = dweight.row_begin(g); s < dweight.row_end(g); ++s) {
      const T* x = inp + static_cast<size_t>(s) * D;
      const T* d = dout + static_cast<size_t>(s) * D;
      for (int i = 0; i < D; ++i) dw[i] += d[i] * x[i] * rstd[s];
    }
  }
}

template <typename T>
void matmul_forward(T* out, const T* inp, const T* w, const T* bias, int S, int I, int O) {
  gemm<T>(false, false, S, O, I, T(1), inp, I, w, O, T(0), out, O);
  if (bias != nullptr) {
#pragma omp parallel for schedule(static)
    for (int s = 0; s < S; ++s) {
      for (int o = 0; o < O; ++o) out[static_cast<size_t>(s) * O + o] += bias[o];
    }
  }
}

template <typename T>
void matmul_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* inp, const T* w, int S,
                     int I, int O) {
  const GradGroups<T> db = GradGroups<T>::single(dbias, S);
  cpu::matmul_backward(dinp, GradGroups<T>::single(dw, S), dbias != nullptr ? &db : nullptr, dout,
                       inp, w, I, O);
}

template <typename T>
void matmul_backward(T* dinp, const GradGroups<T>& dw, const GradGroups<T>* dbias, const T* dout,
                     const T* inp, const T* w, int I, int O) {
  const int S = dw.row_end(dw.groups - 1);
  if (dinp != nullptr) gemm<T>(false, true, S, I, O, T(1), dout, O, w, O, T(1), dinp, I);
  for (int g = 0; g < dw.groups; ++g) {
    const int r0 = dw.row_begin(g), rows = dw.row_end(g) - r0;
    if (rows == 0) continue;
    gemm<T>(true, false, I, O, rows, T(1), inp + static_cast<size_t>(r0) * I, I,
            dout + static_cast<size_t>(r0) * O, O, T(1), dw.at(g), O);
    if (dbias != nullptr) {
      T* db = dbias->at(g);
      for (int s = r0; s < r0 + rows; ++s) {
        for (int o = 0; o < O; ++o) db[o] += dout[static_cast<size_t>(s) * O + o];
      }
    }
  }
}

namespace {
// Returns the group whose buffer holds sum(lo, hi) afterwards (always lo).
template <typename T>
int tree_sum(T* base, size_t stride, int lo, int hi,
             const std::vector<std::pair<size_t, size_t>>& ranges) {
  if (hi - lo == 1) return lo;
  const int mid = lo + (hi - lo) / 2;
  T* a = base + static_cast<size_t>(tree_sum(base, stride, lo, mid, ranges)) * stride;
  const T* b = base + static_cast<size_t>(tree_sum(base, stride, mid, hi, ranges)) * stride;
  for (const auto& range : ranges) {
    // Plain locals, not a structured binding: clang < 16 cannot use bindings in an OpenMP region.
    const size_t offset = range.first, n = range.second;
#pragma omp parallel for schedule(static)
    for (size_t i = offset; i < offset + n; ++i) a[i] += b[i];
  }
  return lo;
}
}  // namespace

template <typename T>
void tree_sum_groups(T* base, size_t stride, int groups,
                     const std::vector<std::pair<size_t, size_t>>& ranges) {
  if (groups > 1) tree_sum(base, stride, 0, groups, ranges);
}

template <typename T>
void silu_forward(T* out, const T* inp, size_t n) {
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; ++i) out[i] = inp[i] * sigmoid(inp[i]);
}

template <typename T>
void silu_backward(T* dinp, const T* dout, const T* inp, size_t n) {
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; ++i) {
    T sg = sigmoid(inp[i]);
    dinp[i] += dout[i] * sg * (T(1) + inp[i] * (T(1) - sg));
  }
}

template <typename T>
void adaln_modulate_forward(T* u, const T* n, const T* m, int S, int D) {
#pragma omp parallel for schedule(static)
  for (int s = 0; s < S; ++s) {
    const T* shift = m + static_cast<size_t>(s) * 3 * D;
    const T* scale = shift + D;
    const T* ns = n + static_cast<size_t>(s) * D;
    T* us = u + static_cast<size_t>(s) * D;
    for (int i = 0; i < D; ++i) us[i] = ns[i] * (T(1) + scale[i]) + shift[i];
  }
}

template <typename T>
void adaln_modulate_backward(T* dn, T* dm, const T* du, const T* n, const T* m, int S, int D) {
#pragma omp parallel for schedule(static)
  for (int s = 0; s < S; ++s) {
    const T* scale = m + static_cast<size_t>(s) * 3 * D + D;
    T* dshift = dm + static_cast<size_t>(s) * 3 * D;
    T* dscale = dshift + D;
    const T* ns = n + static_cast<size_t>(s) * D;
    const T* g = du + static_cast<size_t>(s) * D;
    T* dns = dn + static_cast<size_t>(s) * D;
    for (int i = 0; i < D; ++i) {
      dns[i] += g[i] * (T(1) + scale[i]);
      dshift[i] = g[i];
      dscale[i] = g[i] * ns[i];
    }
  }
}

template <typename T>
void gated_residual_forward(T* x, const T* y, const T* m, int S, int D) {
#pragma omp parallel for schedule(static)
  for (int s = 0; s < S; ++s) {
    T* xs = x + static_cast<size_t>(s) * D;
    const T* ys = y + static_cast<size_t>(s) * D;
    if (m == nullptr) {
      for (int i = 0; i < D; ++i) xs[i] += ys[i];
    } else {
      const T* gate = m + static_cast<size_t>(s) * 3 * D + 2 * D;
      for (int i = 0; i < D; ++i) xs[i] += (T(1) + gate[i]) * ys[i];
    }
  }
}

template <typename T>
void gated_residual_backward(T* dy, T* dm, const T* dx, const T* y, const T* m, int S, int D) {
#pragma omp parallel for schedule(static)
  for (int s = 0; s < S; ++s) {
    const T* g = dx + static_cast<size_t>(s) * D;
    T* dys = dy + static_cast<size_t>(s) * D;
    if (m == nullptr) {
      std::copy_n(g, D, dys);
      continue;
    }
    const T* gate = m + static_cast<size_t>(s) * 3 * D + 2 * D;
    T* dgate = dm + static_cast<size_t>(s) * 3 * D + 2 * D;
    const T* ys = y + static_cast<size_t>(s) * D;
    for (int i = 0; i < D; ++i) {
      dys[i] = (T(1) + gate[i]) * g[i];
      dgate[i] = g[i] * ys[i];
    }
  }
}

template <typename T>
void iteration_encoding(T* pe, int r, int dc) {
  for (int i = 0; i < dc / 2; ++i) {
    double freq = std::pow(10000.0, -2.0 * i / dc);
    pe[2 * i] = static_cast<T>(std::sin(r * freq));
    pe[2 * i + 1] = static_cast<T>(std::cos(r * freq));
  }
}

template <typename T>
void rope_tables(T* cos_t, T* sin_t, int T_, int hd, double theta) {
  for (int p = 0; p < T_; ++p) {
    for (int i = 0; i < hd / 2; ++i) {
      double angle = p * std::pow(theta, -2.0 * i / hd);
      cos_t[p * (hd / 2) + i] = static_cast<T>(std::cos(angle));
      sin_t[p * (hd / 2) + i] = static_cast<T>(std::sin(angle));
    }
  }
}

namespace {
template <typename T>
void rope_rotate(T* qkv, const T* cos_t, const T* sin_t, int B, int T_, int H, int hd, T sign) {
  const int inner = H * hd;
#pragma omp parallel for schedule(static)
  for (int bt = 0; bt < B * T_; ++bt) {
    const int p = bt % T_;
    const T* c = cos_t + p * (hd / 2);
    const T* s = sin_t + p * (hd / 2);
    T* row = qkv + static_cast<size_t>(bt) * 3 * inner;
    for (int part = 0; part < 2; ++part) {  // q then k
      for (int h = 0; h < H; ++h) {
        T* v = row + part * inner + h * hd;
        for (int i = 0; i < hd / 2; ++i) {
          T a = v[2 * i], b = v[2 * i + 1], sn = sign * s[i];
          v[2 * i] = a * c[i] - b * sn;
          v[2 * i + 1] = a * sn + b * c[i];
        }
      }
    }
  }
}
}  // namespace

template <typename T>
void rope_forward(T* qkv, const T* cos_t, const T* sin_t, int B, int T_, int H, int hd) {
  rope_rotate(qkv, cos_t, sin_t, B, T_, H, hd, T(1));
}

template <typename T>
void rope_backward(T* dqkv, const T* cos_t, const T* sin_t, int B, int T_, int H, int hd) {
  // The rotation is orthogonal: its Jacobian transpose is the rotation by the opposite angle.
  rope_rotate(dqkv, cos_t, sin_t, B, T_, H, hd, T(-1));
}

// This file's entries of model/ops_list.h (both families).
LOOPMOE_OPS_EMBEDDING(LOOPMOE_OPS_INSTANTIATE, float)
LOOPMOE_OPS_EMBEDDING(LOOPMOE_OPS_INSTANTIATE, double)
LOOPMOE_OPS_DENSE(LOOPMOE_OPS_INSTANTIATE, float)
LOOPMOE_OPS_DENSE(LOOPMOE_OPS_INSTANTIATE, double)

}  // namespace loopmoe::model::ops::cpu
