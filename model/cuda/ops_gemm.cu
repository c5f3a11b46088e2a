// ops.h on CUDA, part 1: the shared runtime pieces (error messages, the cuBLAS handle, the
// workspace) and the matrix product on cuBLAS (called through cublas_loader.h's table).
#include <cuda_runtime.h>

#include <string>

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

void* workspace(size_t bytes) {
  static void* block = nullptr;
  static size_t capacity = 0;
  if (bytes > capacity) {
    if (block != nullptr) LOOPMOE_CUDA_CHECK(cudaFree(block));
    block = nullptr;
    capacity = 0;
    LOOPMOE_CUDA_CHECK(cudaMalloc(&block, bytes));
    capacity = bytes;
  }
  return block;
}

void gemm_strided_batched(bool trans_a, bool trans_b, int m, int n, int k, float alpha,
                          const float* a, int lda, long long stride_a, const float* b, int ldb,
                          long long stride_b, float beta, float* c, int ldc, long long stride_c,
                          int batch) {
  if (m == 0 || n == 0 || batch == 0) return;
  LOOPMOE_CUBLAS_CHECK(cublas().cublasSgemmStridedBatched(
      cublas_handle(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, n,
      m, k, &alpha, b, ldb, stride_b, a, lda, stride_a, &beta, c, ldc, stride_c, batch));
}

}  // namespace kernel_util

template <>
void gemm<float>(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a,
                 int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  if (m == 0 || n == 0) return;
  // Row-major C[m,n] is column-major C^T[n,m]: C^T = op(B)^T op(A)^T, so B goes first (ops_cuda.h).
  LOOPMOE_CUBLAS_CHECK(cublas().cublasSgemm_v2(
      kernel_util::cublas_handle(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
      trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, &alpha, b, ldb, a, lda, &beta, c, ldc));
}

}  // namespace loopmoe::model::ops::cuda
