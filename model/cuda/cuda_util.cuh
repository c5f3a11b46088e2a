// Internal helpers of the CUDA kernels (model/cuda/*.cu only): error checks that turn a failed
// CUDA or cuBLAS call into std::runtime_error, launch shapes, the deterministic block reductions
// every row kernel uses, the shared cuBLAS handle and the grow-only device workspace.
//
// Every launch goes to the default stream, so kernels, cuBLAS calls and cudaMemcpy calls run in
// issue order and a kernel never sees a half-written input. Launch errors are checked right after
// the launch (cudaGetLastError); faults inside a kernel surface at the next synchronising call.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "model/cuda/cublas_loader.h"  // cuBLAS's types; its functions through cublas()
#include "model/cuda/ops_cuda.h"

namespace loopmoe::model::ops::cuda::kernel_util {

[[noreturn]] void throw_cuda_error(cudaError_t error, const char* call, const char* file, int line);
[[noreturn]] void throw_cublas_error(cublasStatus_t status, const char* call, const char* file,
                                     int line);

inline void check_cuda(cudaError_t error, const char* call, const char* file, int line) {
  if (error != cudaSuccess) throw_cuda_error(error, call, file, line);
}
inline void check_cublas(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status != CUBLAS_STATUS_SUCCESS) throw_cublas_error(status, call, file, line);
}

// The process's cuBLAS handle, created on first use (on the current device, default stream,
// CUBLAS_DEFAULT_MATH: plain fp32 FMA, no TF32). That first use also loads cuBLAS
// (cublas_loader.h), so it throws the loader's error when the library cannot be loaded. Never
// destroyed: destroying it from a static destructor may run after the CUDA runtime has shut down.
cublasHandle_t cublas_handle();

// At least `bytes` of device memory for a kernel's temporaries (column-sum partials, attention's
// dP). Grow-only and shared by every op: an op may use it between its own launches only, and the
// ops run on one host thread on the default stream, so a later op's use is ordered after an
// earlier op's kernels. Growing frees the old block (cudaFree synchronises the device first).
void* workspace(size_t bytes);

// gemm_strided_batched (the attention kernels' batched product) is declared in ops_cuda.h, where
// the tests reach it.

}  // namespace loopmoe::model::ops::cuda::kernel_util

// Each throws std::runtime_error naming the call, the file and line, and CUDA's error string.
#define LOOPMOE_CUDA_CHECK(call) \
  ::loopmoe::model::ops::cuda::kernel_util::check_cuda((call), #call, __FILE__, __LINE__)
#define LOOPMOE_CUBLAS_CHECK(call) \
  ::loopmoe::model::ops::cuda::kernel_util::check_cublas((call), #call, __FILE__, __LINE__)
// After every kernel launch: a bad launch configuration or a missing kernel image.
#define LOOPMOE_CUDA_CHECK_LAUNCH() LOOPMOE_CUDA_CHECK(cudaGetLastError())

namespace loopmoe::model::ops::cuda::kernel_util {

constexpr int kThreads = 256;  // elementwise kernels
// Grid for a grid-stride loop over n items (n > 0); at most 2^20 blocks, the loop covers the rest.
inline unsigned grid_for(size_t n, int threads = kThreads) {
  const size_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < (size_t{1} << 20) ? blocks : (size_t{1} << 20));
}

// Threads of a kernel that gives one block to each row of `width` values: a multiple of 32 from
// 32 to 256. It depends on the width only (never on the number of rows), so a row's reduction
// order, and hence its bits, is the same whatever rows share the call (batch invariance).
inline int row_threads(int width) {
  const int rounded = (width + 31) / 32 * 32;
  return rounded < 32 ? 32 : (rounded > 256 ? 256 : rounded);
}

template <typename F>
__global__ void for_each_index_kernel(size_t n, F f) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    f(i);
  }
}
// f(i) for every i < n, in parallel (elementwise work: each i writes its own outputs).
template <typename F>
void for_each_index(size_t n, F f) {
  if (n == 0) return;
  for_each_index_kernel<<<grid_for(n), kThreads>>>(n, f);
  LOOPMOE_CUDA_CHECK_LAUNCH();
}

__device__ inline float device_exp(float x) { return expf(x); }
__device__ inline double device_exp(double x) { return exp(x); }
__device__ inline float device_log(float x) { return logf(x); }
__device__ inline double device_log(double x) { return log(x); }
__device__ inline float device_sqrt(float x) { return sqrtf(x); }
__device__ inline double device_sqrt(double x) { return sqrt(x); }
template <typename T>
__device__ inline T device_sigmoid(T x) {
  return T(1) / (T(1) + device_exp(-x));
}

// The sum over the warp, the same value in every lane: a butterfly (xor offsets 16, 8, 4, 2, 1).
// Lanes add the same pairs in the same tree (a + b == b + a exactly), so every lane's result, and
// the result of every run, is bit-identical.
template <typename T>
__device__ inline T warp_sum(T value) {
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}
template <typename T>
__device__ inline T warp_max(T value) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(0xffffffffu, value, offset);
    value = other > value ? other : value;
  }
  return value;
}

// The sum over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
// Order: each warp's butterfly (warp_sum), then the warps' sums, in a second butterfly over warp
// index (missing warps contribute 0). Fixed for a given blockDim.x, so deterministic. `shared`
// holds 32 values; the leading __syncthreads lets a kernel call this several times in a row.
template <typename T>
__device__ inline T block_sum(T value, T* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  value = warp_sum(value);
  __syncthreads();
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  return warp_sum(lane < warps ? shared[lane] : T(0));
}
template <typename T>
__device__ inline T block_max(T value, T* shared, T lowest) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  value = warp_max(value);
  __syncthreads();
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  return warp_max(lane < warps ? shared[lane] : lowest);
}

// out[i] (+)= Σ_{r in [row_begin, row_end)} term(r, i) for i < D: column sums over rows, e.g. a
// weight gradient or a bias gradient. Order (fixed, so bit-reproducible; not the CPU's plain
// row order): the rows are cut into chunks of kColumnChunkRows consecutive rows counted from
// row_begin; pass 1 gives one thread to each (chunk, column) and sums the chunk's rows in row
// order from 0; pass 2 gives one thread to each column and adds the chunk partials in chunk
// order from 0, then adds that total to out[i] (accumulate) or stores it. No atomics.
constexpr int kColumnChunkRows = 64;

template <typename T, typename Term>
__global__ void column_chunk_kernel(T* partial, int row_begin, int row_end, int D, Term term) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int chunk = blockIdx.y;
  if (i >= D) return;
  const int r0 = row_begin + chunk * kColumnChunkRows;
  const int r1 = r0 + kColumnChunkRows < row_end ? r0 + kColumnChunkRows : row_end;
  T sum = 0;
  for (int r = r0; r < r1; ++r) sum += term(r, i);
  partial[static_cast<size_t>(chunk) * D + i] = sum;
}
// term(r, i) = x[r, i]: plain column sums (bias gradients, sum_rows).
template <typename T>
struct RowValue {
  const T* x;
  int D;
  __device__ T operator()(int r, int i) const { return x[static_cast<size_t>(r) * D + i]; }
};

template <typename T>
__global__ void column_total_kernel(T* out, const T* partial, int chunks, int D, bool accumulate) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= D) return;
  T sum = 0;
  for (int c = 0; c < chunks; ++c) sum += partial[static_cast<size_t>(c) * D + i];
  out[i] = accumulate ? out[i] + sum : sum;
}
template <typename T, typename Term>
void column_sums(T* out, int row_begin, int row_end, int D, Term term, bool accumulate = true) {
  const int rows = row_end - row_begin;
  if (rows <= 0 || D <= 0) return;
  const int chunks = (rows + kColumnChunkRows - 1) / kColumnChunkRows;
  if (chunks > 65535) throw std::runtime_error("column_sums: too many rows for one call");
  T* partial = static_cast<T*>(workspace(sizeof(T) * static_cast<size_t>(chunks) * D));
  const unsigned column_blocks = static_cast<unsigned>((D + kThreads - 1) / kThreads);
  column_chunk_kernel<<<dim3(column_blocks, static_cast<unsigned>(chunks)), kThreads>>>(
      partial, row_begin, row_end, D, term);
  LOOPMOE_CUDA_CHECK_LAUNCH();
  column_total_kernel<<<column_blocks, kThreads>>>(out, partial, chunks, D, accumulate);
  LOOPMOE_CUDA_CHECK_LAUNCH();
}

// Copies n values between host and device (synchronous on the default stream).
template <typename T>
void to_device(T* device, const T* host, size_t n) {
  if (n > 0) LOOPMOE_CUDA_CHECK(cudaMemcpy(device, host, n * sizeof(T), cudaMemcpyHostToDevice));
}
template <typename T>
void to_host(T* host, const T* device, size_t n) {
  if (n > 0) LOOPMOE_CUDA_CHECK(cudaMemcpy(host, device, n * sizeof(T), cudaMemcpyDeviceToHost));
}

}  // namespace loopmoe::model::ops::cuda::kernel_util
