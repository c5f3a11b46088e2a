// ops.h on CUDA, part 2: the row kernels of the dense path (RMSNorm, matmul with bias, SiLU,
// IterAdaLN modulation, gated residual, rotary embedding) and the gradient groups' fixed pairwise
// tree; the embedding is in ops_embedding.cu. Mirrors model/cpu/ops_dense.cc; differences are
// listed in ops_cuda.h.
#include <cmath>
#include <vector>

#include "model/cuda/cuda_util.cuh"
#include "model/cuda/ops_cuda.h"

namespace loopmoe::model::ops::cuda {

using kernel_util::block_sum;
using kernel_util::column_sums;
using kernel_util::device_sigmoid;
using kernel_util::device_sqrt;
using kernel_util::for_each_index;

// One block per row. Sum of squares: thread j adds elements j, j + blockDim, ... in order, then
// block_sum's fixed tree.
template <typename T>
__global__ void rmsnorm_forward_kernel(T* out, T* rstd, const T* inp, const T* weight, int D) {
  __shared__ T shared[32];
  const size_t row = blockIdx.x;
  const T* x = inp + row * D;
  T* y = out + row * D;
  T ss = 0;
  for (int i = threadIdx.x; i < D; i += blockDim.x) ss += x[i] * x[i];
  ss = block_sum(ss, shared);
  const T r = T(1) / device_sqrt(ss / T(D) + T(1e-5));
  if (threadIdx.x == 0) rstd[row] = r;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    y[i] = weight != nullptr ? x[i] * r * weight[i] : x[i] * r;
  }
}

template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int S, int D) {
  if (S <= 0) return;
  rmsnorm_forward_kernel<<<S, kernel_util::row_threads(D)>>>(out, rstd, inp, weight, D);
  LOOPMOE_CUDA_CHECK_LAUNCH();
}

// One block per row; the dot product in the same order as rmsnorm_forward_kernel's sum.
template <typename T>
__global__ void rmsnorm_backward_kernel(T* dinp, const T* dout, const T* inp, const T* weight,
                                        const T* rstd, int D) {
  __shared__ T shared[32];
  const size_t row = blockIdx.x;
  const T* x = inp + row * D;
  const T* g = dout + row * D;
  T* dx = dinp + row * D;
  const T r = rstd[row];
  // With n = x*r and dn = g*w: dx = r * (dn - n * mean(dn ⊙ n)).
  T dot = 0;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    dot += g[i] * (weight != nullptr ? weight[i] : T(1)) * x[i] * r;
  }
  dot = block_sum(dot, shared) / T(D);
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    const T dn = g[i] * (weight != nullptr ? weight[i] : T(1));
    dx[i] += r * (dn - x[i] * r * dot);
  }
}

namespace {
// term(r, i) of the gain's gradient: dout ⊙ inp · rstd.
template <typename T>
struct RmsnormWeightTerm {
  const T* dout;
  const T* inp;
  const T* rstd;
  int D;
  __device__ T operator()(int r, int i) const {
    const size_t at = static_cast<size_t>(r) * D + i;
    return dout[at] * inp[at] * rstd[r];
  }
};
}  // namespace

template <typename T>
void rmsnorm_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight,
                      const T* rstd, int S, int D) {
  if (S <= 0) return;
  rmsnorm_backward_kernel<<<S, kernel_util::row_threads(D)>>>(dinp, dout, inp, weight, rstd, D);
  LOOPMOE_CUDA_CHECK_LAUNCH();
  if (dweight != nullptr) column_sums(dweight, 0, S, D, RmsnormWeightTerm<T>{dout, inp, rstd, D});
}

template <typename T>
void rmsnorm_weight_backward(const GradGroups<T>& dweight, const T* dout, const T* inp,
                             const T* rstd, int D) {
  for (int g = 0; g < dweight.groups; ++g) {
    column_sums(dweight.at(g), dweight.row_begin(g), dweight.row_end(g), D,
                RmsnormWeightTerm<T>{dout, inp, rstd, D});
  }
}

template <typename T>
void matmul_forward(T* out, const T* inp, const T* w, const T* bias, int S, int I, int O) {
  gemm<T>(false, false, S, O, I, T(1), inp, I, w, O, T(0), out, O);
  if (bias != nullptr) {
    for_each_index(static_cast<size_t>(S) * O,
                   [=] __device__(size_t idx) { out[idx] += bias[idx % O]; });
  }
}

template <typename T>
void matmul_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* inp, const T* w, int S,
                     int I, int O) {
  const GradGroups<T> db = GradGroups<T>::single(dbias, S);
  cuda::matmul_backward(dinp, GradGroups<T>::single(dw, S), dbias != nullptr ? &db : nullptr, dout,
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
      column_sums(dbias->at(g), r0, r0 + rows, O, kernel_util::RowValue<T>{dout, O});
    }
  }
}

namespace {
// The CPU's recursion (ops_dense.cc tree_sum): the same pairs added in the same order, each an
// elementwise a[i] += b[i], so the result is the CPU's bit for bit.
template <typename T>
int tree_sum(T* base, size_t stride, int lo, int hi,
             const std::vector<std::pair<size_t, size_t>>& ranges) {
  if (hi - lo == 1) return lo;
  const int mid = lo + (hi - lo) / 2;
  T* a = base + static_cast<size_t>(tree_sum(base, stride, lo, mid, ranges)) * stride;
  const T* b = base + static_cast<size_t>(tree_sum(base, stride, mid, hi, ranges)) * stride;
  for (const auto& [offset, n] : ranges) {
    T* a_range = a + offset;
    const T* b_range = b + offset;
    for_each_index(n, [=] __device__(size_t i) { a_range[i] += b_range[i]; });
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
  for_each_index(n, [=] __device__(size_t i) { out[i] = inp[i] * device_sigmoid(inp[i]); });
}

template <typename T>
void silu_backward(T* dinp, const T* dout, const T* inp, size_t n) {
  for_each_index(n, [=] __device__(size_t i) {
    const T sg = device_sigmoid(inp[i]);
    dinp[i] += dout[i] * sg * (T(1) + inp[i] * (T(1) - sg));
  });
}

template <typename T>
void adaln_modulate_forward(T* u, const T* n, const T* m, int S, int D) {
  for_each_index(static_cast<size_t>(S) * D, [=] __device__(size_t idx) {
    const size_t s = idx / D, i = idx % D;
    const T* shift = m + s * 3 * D;
    u[idx] = n[idx] * (T(1) + shift[D + i]) + shift[i];
  });
}

template <typename T>
void adaln_modulate_backward(T* dn, T* dm, const T* du, const T* n, const T* m, int S, int D) {
  for_each_index(static_cast<size_t>(S) * D, [=] __device__(size_t idx) {
    const size_t s = idx / D, i = idx % D;
    const T scale = m[s * 3 * D + D + i];
    T* dshift = dm + s * 3 * D;
    const T g = du[idx];
    dn[idx] += g * (T(1) + scale);
    dshift[i] = g;
    dshift[D + i] = g * n[idx];
  });
}

template <typename T>
void gated_residual_forward(T* x, const T* y, const T* m, int S, int D) {
  if (m == nullptr) {
    for_each_index(static_cast<size_t>(S) * D, [=] __device__(size_t idx) { x[idx] += y[idx]; });
    return;
  }
  for_each_index(static_cast<size_t>(S) * D, [=] __device__(size_t idx) {
    const size_t s = idx / D, i = idx % D;
    x[idx] += (T(1) + m[s * 3 * D + 2 * D + i]) * y[idx];
  });
}

template <typename T>
void gated_residual_backward(T* dy, T* dm, const T* dx, const T* y, const T* m, int S, int D) {
  if (m == nullptr) {
    for_each_index(static_cast<size_t>(S) * D, [=] __device__(size_t idx) { dy[idx] = dx[idx]; });
    return;
  }
  for_each_index(static_cast<size_t>(S) * D, [=] __device__(size_t idx) {
    const size_t s = idx / D, i = idx % D;
    const size_t gate_at = s * 3 * D + 2 * D + i;
    dy[idx] = (T(1) + m[gate_at]) * dx[idx];
    dm[gate_at] = dx[idx] * y[idx];
  });
}

template <typename T>
void iteration_encoding(T* pe, int r, int dc) {
  // A dc-vector once per layer application: the host's double sin/cos, as on the CPU.
  std::vector<T> host(dc > 0 ? dc : 0, T(0));
  for (int i = 0; i < dc / 2; ++i) {
    const double freq = std::pow(10000.0, -2.0 * i / dc);
    host[2 * i] = static_cast<T>(std::sin(r * freq));
    host[2 * i + 1] = static_cast<T>(std::cos(r * freq));
  }
  kernel_util::to_device(pe, host.data(), static_cast<size_t>(2 * (dc / 2)));
}

template <typename T>
void rope_tables(T* cos_t, T* sin_t, int T_, int hd, double theta) {
  const size_t n = static_cast<size_t>(T_) * (hd / 2);
  std::vector<T> c(n), s(n);
  for (int p = 0; p < T_; ++p) {
    for (int i = 0; i < hd / 2; ++i) {
      const double angle = p * std::pow(theta, -2.0 * i / hd);
      c[static_cast<size_t>(p) * (hd / 2) + i] = static_cast<T>(std::cos(angle));
      s[static_cast<size_t>(p) * (hd / 2) + i] = static_cast<T>(std::sin(angle));
    }
  }
  kernel_util::to_device(cos_t, c.data(), n);
  kernel_util::to_device(sin_t, s.data(), n);
}

namespace {
// One thread per rotated pair: (row bt, q or k, head h, pair i).
template <typename T>
void rope_rotate(T* qkv, const T* cos_t, const T* sin_t, int B, int T_, int H, int hd, T sign) {
  const int half = hd / 2, inner = H * hd;
  const size_t pairs = static_cast<size_t>(B) * T_ * 2 * H * half;
  for_each_index(pairs, [=] __device__(size_t idx) {
    const int i = static_cast<int>(idx % half);
    size_t rest = idx / half;
    const int h = static_cast<int>(rest % H);
    rest /= H;
    const int part = static_cast<int>(rest % 2);
    const size_t bt = rest / 2;
    const int p = static_cast<int>(bt % T_);
    const T c = cos_t[static_cast<size_t>(p) * half + i];
    const T sn = sign * sin_t[static_cast<size_t>(p) * half + i];
    T* v = qkv + bt * 3 * inner + part * inner + h * hd;
    const T a = v[2 * i], b = v[2 * i + 1];
    v[2 * i] = a * c - b * sn;
    v[2 * i + 1] = a * sn + b * c;
  });
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

// This file's entries of model/ops_list.h.
LOOPMOE_OPS_DENSE(LOOPMOE_OPS_INSTANTIATE, float)

}  // namespace loopmoe::model::ops::cuda
