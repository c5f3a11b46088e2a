// ops.h on CUDA, part 1: the shared runtime pieces (error messages, the cuBLAS handle, the
// workspace) and the matrix product on cuBLAS (called through cublas_loader.h's table), in fp32
// or, with ops::matmul_precision() == kBf16, with bf16 operands (ops.h MatmulPrecision).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <string>

#include "model/bf16.h"
#include "model/cuda/cublas_loader.h"
#include "model/cuda/cuda_util.cuh"
#include "model/cuda/ops_cuda.h"

namespace loopmoe::model::ops::cuda {
namespace kernel_util {

void throw_cuda_error(cudaError_t error, const char* call, const char* file, int line) {
  throw std::runtime_error(std::string(call) + " failed at " + file + ":" + std::to_string(line) +
                           ": " + cudaGetErrorString(error));
}

void throw_cublas_error(cublasStatus_t status, const char* call, const char* file, int line) {
  throw std::runtime_error(std::string(call) + " failed at " + file + ":" + std::to_string(line) +
                           ": " + cublas().cublasGetStatusString(status));
}

cublasHandle_t cublas_handle() {
  static cublasHandle_t handle = [] {
    cublasHandle_t h = nullptr;
    LOOPMOE_CUBLAS_CHECK(cublas().cublasCreate_v2(&h));
    // Plain fp32: no TF32 tensor-core rounding of the inputs (the CPU parity needs fp32 products).
    LOOPMOE_CUBLAS_CHECK(cublas().cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
    return h;
  }();
  return handle;
}

namespace {

// A grow-only device block: reallocated (contents dropped) when `bytes` exceeds its capacity.
void* grow_block(void*& block, size_t& capacity, size_t bytes) {
  if (bytes > capacity) {
    if (block != nullptr) LOOPMOE_CUDA_CHECK(cudaFree(block));
    block = nullptr;
    capacity = 0;
    LOOPMOE_CUDA_CHECK(cudaMalloc(&block, bytes));
    capacity = bytes;
  }
  return block;
}

}  // namespace

void* workspace(size_t bytes) {
  static void* block = nullptr;
  static size_t capacity = 0;
  return grow_block(block, capacity, bytes);
}

namespace {

// The bf16 product (train.precision = "bf16"): each operand is converted once per call into
// packed bf16 device memory by round_operands (model/bf16.h's bits, so exactly the values the CPU
// emulation multiplies), then cublasGemmEx / cublasGemmStridedBatchedEx multiply them with
// CUBLAS_COMPUTE_32F into the fp32 C (alpha, beta fp32; C not rounded). Products of two bf16
// values are exact in fp32, so GPU and CPU differ by the accumulation order only. cuBLAS's Ex
// calls on the existing handle rather than cuBLASLt: no second library to load, the same
// column-major transpose trick as the fp32 path, and bf16 inputs with fp32 compute run on the
// tensor cores whatever the handle's math mode (CUBLAS_DEFAULT_MATH keeps the fp32 path off TF32).

// Grow-only device memory for the converted operands, its own block (not workspace(): a caller
// such as attention_backward may hold the workspace across its products).
__nv_bfloat16* bf16_operands(size_t elements) {
  static void* block = nullptr;
  static size_t capacity = 0;
  return static_cast<__nv_bfloat16*>(grow_block(block, capacity, elements * sizeof(__nv_bfloat16)));
}

// `batch` stored row-major matrices of rows x cols (leading dimension ld, matrix i at src + i *
// stride) rounded to bf16 into dst, packed: leading dimension cols, matrix i at i * rows * cols.
__global__ void round_operands_kernel(__nv_bfloat16* dst, const float* src, size_t n, int rows,
                                      int cols, int ld, long long stride) {
  const size_t per = static_cast<size_t>(rows) * cols;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t b = i / per, r = (i % per) / cols, col = i % cols;
    const float x = src[b * stride + r * ld + col];
    const uint32_t bits = bf16_round_bits(__float_as_uint(x));
    dst[i] = __ushort_as_bfloat16(static_cast<unsigned short>(bits >> 16));
  }
}
void round_operands(__nv_bfloat16* dst, const float* src, int rows, int cols, int ld,
                    long long stride, int batch) {
  const size_t n = static_cast<size_t>(rows) * cols * batch;
  round_operands_kernel<<<grid_for(n), kThreads>>>(dst, src, n, rows, cols, ld, stride);
  LOOPMOE_CUDA_CHECK_LAUNCH();
}

// The bf16 version of gemm_strided_batched (batch == 1: cublasGemmEx). k > 0.
void gemm_bf16(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a,
               int lda, long long stride_a, const float* b, int ldb, long long stride_b, float beta,
               float* c, int ldc, long long stride_c, int batch) {
  const int a_rows = trans_a ? k : m, a_cols = trans_a ? m : k;
  const int b_rows = trans_b ? n : k, b_cols = trans_b ? k : n;
  const long long a_size = static_cast<long long>(a_rows) * a_cols;
  const long long b_size = static_cast<long long>(b_rows) * b_cols;
  __nv_bfloat16* a16 = bf16_operands(static_cast<size_t>((a_size + b_size) * batch));
  __nv_bfloat16* b16 = a16 + a_size * batch;
  round_operands(a16, a, a_rows, a_cols, lda, stride_a, batch);
  round_operands(b16, b, b_rows, b_cols, ldb, stride_b, batch);
  const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  if (batch == 1) {
    LOOPMOE_CUBLAS_CHECK(cublas().cublasGemmEx(
        cublas_handle(), op_b, op_a, n, m, k, &alpha, b16, CUDA_R_16BF, b_cols, a16, CUDA_R_16BF,
        a_cols, &beta, c, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return;
  }
  LOOPMOE_CUBLAS_CHECK(cublas().cublasGemmStridedBatchedEx(
      cublas_handle(), op_b, op_a, n, m, k, &alpha, b16, CUDA_R_16BF, b_cols, b_size, a16,
      CUDA_R_16BF, a_cols, a_size, &beta, c, CUDA_R_32F, ldc, stride_c, batch, CUBLAS_COMPUTE_32F,
      CUBLAS_GEMM_DEFAULT));
}

bool bf16_products(int k) { return k > 0 && matmul_precision() == MatmulPrecision::kBf16; }

}  // namespace

void gemm_strided_batched(bool trans_a, bool trans_b, int m, int n, int k, float alpha,
                          const float* a, int lda, long long stride_a, const float* b, int ldb,
                          long long stride_b, float beta, float* c, int ldc, long long stride_c,
                          int batch) {
  if (m == 0 || n == 0 || batch == 0) return;
  if (bf16_products(k)) {
    gemm_bf16(trans_a, trans_b, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc,
              stride_c, batch);
    return;
  }
  LOOPMOE_CUBLAS_CHECK(cublas().cublasSgemmStridedBatched(
      cublas_handle(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, n,
      m, k, &alpha, b, ldb, stride_b, a, lda, stride_a, &beta, c, ldc, stride_c, batch));
}

}  // namespace kernel_util

template <>
void gemm<float>(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a,
                 int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  if (m == 0 || n == 0) return;
  if (kernel_util::bf16_products(k)) {
    kernel_util::gemm_bf16(trans_a, trans_b, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0,
                           1);
    return;
  }
  // Row-major C[m,n] is column-major C^T[n,m]: C^T = op(B)^T op(A)^T, so B goes first (ops_cuda.h).
  LOOPMOE_CUBLAS_CHECK(cublas().cublasSgemm_v2(
      kernel_util::cublas_handle(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
      trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, &alpha, b, ldb, a, lda, &beta, c, ldc));
}

}  // namespace loopmoe::model::ops::cuda
