// ops.h on CUDA, part 5: the kernels of model/cpu/ops_strict.cc (optimiser, gradient norm, row
// vector broadcast and column sums, the gradient groups' adds, adaptive halting). Compiled with
// --fmad=false (model/cuda/CMakeLists.txt) like the CPU file is compiled without fast-math, so
// each elementwise formula rounds after every operation as written; the elementwise results are
// then the CPU's bits wherever the CPU compiler did not contract them either.
#include <algorithm>
#include <cmath>

#include "model/cuda/cuda_util.cuh"
#include "model/cuda/ops_cuda.h"

namespace loopmoe::model::ops::cuda {

using kernel_util::block_sum;
using kernel_util::for_each_index;

template <typename T>
void add_row_vector(T* x, const T* v, int S, int D) {
  for_each_index(static_cast<size_t>(S) * D, [=] __device__(size_t idx) { x[idx] += v[idx % D]; });
}

template <typename T>
void sum_rows(T* out, const T* x, int rows, int D) {
  kernel_util::column_sums(out, 0, rows, D, kernel_util::RowValue<T>{x, D});
}

template <typename T>
void add_inplace(T* dst, const T* src, size_t n) {
  for_each_index(n, [=] __device__(size_t i) { dst[i] += src[i]; });
}

template <typename T>
void copy_masked_rows(T* x, const T* src, const int32_t* mask, int S, int D) {
  for_each_index(static_cast<size_t>(S) * D, [=] __device__(size_t idx) {
    if (mask[idx / D]) x[idx] = src[idx];
  });
}

namespace {
// One block per row; both norms in double, each thread's terms in column order, then block_sum.
template <typename T>
__global__ void halt_converged_rows_kernel(int32_t* halted_at, T* frozen, const T* prev,
                                           const T* cur, int D, double threshold, int iteration) {
  __shared__ double shared[32];
  const size_t t = blockIdx.x;
  if (halted_at[t]) return;  // the same for the whole block
  const T* x0 = prev + t * D;
  const T* x1 = cur + t * D;
  double diff = 0, norm = 0;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    const double a = x0[i], b = x1[i];
    diff += (b - a) * (b - a);
    norm += a * a;
  }
  diff = block_sum(diff, shared);
  norm = block_sum(norm, shared);
  if (!(sqrt(diff) < threshold * sqrt(norm > 1e-30 ? norm : 1e-30))) return;
  for (int i = threadIdx.x; i < D; i += blockDim.x) frozen[t * D + i] = x1[i];
  if (threadIdx.x == 0) halted_at[t] = iteration;
}
}  // namespace

template <typename T>
void halt_converged_rows(int32_t* halted_at, T* frozen, const T* prev, const T* cur, int S, int D,
                         double threshold, int iteration) {
  if (S <= 0) return;
  halt_converged_rows_kernel<<<S, kernel_util::row_threads(D)>>>(halted_at, frozen, prev, cur, D,
                                                                 threshold, iteration);
  LOOPMOE_CUDA_CHECK_LAUNCH();
}

namespace {
constexpr size_t kSquaresBlock = 4096;  // elements per partial sum, as on the CPU
constexpr int kSquaresThreads = 256;

// Block b sums g[i]² (in double) over its 4096 elements: thread j adds elements b·4096 + j,
// + 256, ... in order, then block_sum's tree.
__global__ void sum_squares_blocks_kernel(double* partial, const float* g, size_t n) {
  __shared__ double shared[32];
  const size_t begin = blockIdx.x * kSquaresBlock;
  const size_t end = begin + kSquaresBlock < n ? begin + kSquaresBlock : n;
  double s = 0;
  for (size_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    s += static_cast<double>(g[i]) * g[i];
  }
  s = block_sum(s, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
// One block adds the partials: thread j adds partials j, j + 1024, ... in order, then the tree.
__global__ void sum_squares_total_kernel(double* total, const double* partial, size_t blocks) {
  __shared__ double shared[32];
  double s = 0;
  for (size_t b = threadIdx.x; b < blocks; b += blockDim.x) s += partial[b];
  s = block_sum(s, shared);
  if (threadIdx.x == 0) *total = s;
}
}  // namespace

double sum_squares(const float* g, size_t n) {
  if (n == 0) return 0.0;
  const size_t blocks = (n + kSquaresBlock - 1) / kSquaresBlock;
  if (blocks > 0x7fffffffu) throw std::runtime_error("sum_squares: too many elements");
  // [0]: the total, [1, blocks]: the partials.
  double* scratch = static_cast<double*>(kernel_util::workspace(sizeof(double) * (blocks + 1)));
  sum_squares_blocks_kernel<<<static_cast<unsigned>(blocks), kSquaresThreads>>>(scratch + 1, g, n);
  LOOPMOE_CUDA_CHECK_LAUNCH();
  sum_squares_total_kernel<<<1, 1024>>>(scratch, scratch + 1, blocks);
  LOOPMOE_CUDA_CHECK_LAUNCH();
  double total = 0;
  kernel_util::to_host(&total, scratch, 1);
  return total;
}

void scale_inplace(float* g, size_t n, float c) {
  for_each_index(n, [=] __device__(size_t i) { g[i] *= c; });
}

void adamw_update(float* p, float* m, float* v, const float* g, const uint8_t* decay, size_t n,
                  const AdamWStep& s) {
  const float b1 = s.beta1, b2 = s.beta2, c1 = s.c1, c2 = s.c2, lrf = s.lr, eps = s.eps;
  const float wd = s.weight_decay;
  for_each_index(n, [=] __device__(size_t i) {
    const float gi = g[i];
    m[i] = b1 * m[i] + (1.f - b1) * gi;
    v[i] = b2 * v[i] + (1.f - b2) * gi * gi;
    const float mh = m[i] * c1, vh = v[i] * c2;
    p[i] -= lrf * (mh / (sqrtf(vh) + eps) + (decay[i] ? wd * p[i] : 0.f));
  });
}

// This file's entries of model/ops_list.h.
LOOPMOE_OPS_STRICT(LOOPMOE_OPS_INSTANTIATE, float)

}  // namespace loopmoe::model::ops::cuda
