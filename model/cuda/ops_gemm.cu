// ops.h on CUDA, part 1: the shared runtime pieces (error messages, the cuBLAS handle, the
// workspace) and the matrix product on cuBLAS (called through cublas_loader.h's table), in fp32
// or, with ops::matmul_precision() == kBf16, with bf16 operands (ops.h MatmulPrecision); and the
// grouped product of many independent ones (gemm_grouped, the experts').
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

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
  // The CPU's counters, as its gemm charges them (ops.h charge_gemm_flops).
  charge_gemm_flops(2ull * m * n * k * static_cast<uint64_t>(batch));
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
  charge_gemm_flops(2ull * m * n * k);  // the CPU's counters, as its gemm charges them
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

namespace kernel_util {
namespace {

// Device memory for gemm_grouped's pointer arrays, its own grow-only block (a caller may hold
// workspace() across its products, and bf16_operands belongs to gemm's bf16 path).
void** grouped_pointers(size_t count) {
  static void* block = nullptr;
  static size_t capacity = 0;
  return static_cast<void**>(grow_block(block, capacity, count * sizeof(void*)));
}

// The pointer arrays reach the device as kernel parameters: a launch copies its parameters when
// it is queued, so the host array may go away at once, and the kernel writing the block runs
// after every earlier kernel of the stream (the previous grouped product still reading the block
// included) and before the product that reads it. A cudaMemcpy from pageable memory would do the
// same only by waiting on the host for the device to drain. 448 pointers: 3.5 KB, inside the
// 4 KB that kernel parameters may take on every architecture and toolkit.
constexpr int kPointersPerFill = 448;
struct PointerChunk {
  void* pointers[kPointersPerFill];
};
__global__ void fill_pointers_kernel(void** dst, PointerChunk chunk, int count) {
  for (int i = threadIdx.x; i < count; i += blockDim.x) dst[i] = chunk.pointers[i];
}
void copy_pointers_to_device(void** dst, const std::vector<void*>& src) {
  for (size_t begin = 0; begin < src.size(); begin += kPointersPerFill) {
    const int count = static_cast<int>(std::min<size_t>(kPointersPerFill, src.size() - begin));
    PointerChunk chunk{};
    std::copy_n(src.data() + begin, count, chunk.pointers);
    fill_pointers_kernel<<<1, 128>>>(dst + begin, chunk, count);
    LOOPMOE_CUDA_CHECK_LAUNCH();
  }
}

bool same_group(const GemmProblem& p, const GemmProblem& q) {
  return p.trans_a == q.trans_a && p.trans_b == q.trans_b && p.m == q.m && p.n == q.n &&
         p.k == q.k && p.lda == q.lda && p.ldb == q.ldb && p.ldc == q.ldc && p.alpha == q.alpha &&
         p.beta == q.beta;
}

}  // namespace

void gemm_grouped(const GemmProblem* problems, int count) {
  // bf16: cuBLAS documents cublasGemmGroupedBatchedEx for CUDA_R_16BF A and B with a CUDA_R_16BF
  // C only (https://docs.nvidia.com/cuda/cublas/index.html#cublasgemmgroupedbatchedex), and the
  // grouped kernels libcublas.so.13 ships are bf16 -> bf16, f16 -> f16, fp32 (SIMT or TF32) and
  // fp64; a bf16 C would round the result, which the maths keeps in fp32 (ops.h
  // MatmulPrecision). So each product runs as gemm runs it: operands rounded by round_operands,
  // one cublasGemmEx. (tests/cuda/test_cuda_moe.cc asks cuBLAS whether it takes bf16 into fp32.)
  if (matmul_precision() == MatmulPrecision::kBf16) {
    for (int i = 0; i < count; ++i) {
      const GemmProblem& p = problems[i];
      gemm<float>(p.trans_a, p.trans_b, p.m, p.n, p.k, p.alpha, p.a, p.lda, p.b, p.ldb, p.beta, p.c,
                  p.ldc);
    }
    return;
  }
  // cuBLAS's column-major view, per group, with gemm's transpose trick (ops_cuda.h): row-major
  // C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T, so cuBLAS's A is our B (its op and
  // leading dimension) and its m, n are our n, m.
  std::vector<cublasOperation_t> op_first, op_second;
  std::vector<int> rows, cols, inner, ld_first, ld_second, ld_c, group_size;
  std::vector<float> alpha, beta;
  std::vector<void*> first, second, c;  // per problem: cuBLAS's A (our B), B (our A), C
  const GemmProblem* last = nullptr;
  for (int i = 0; i < count; ++i) {
    const GemmProblem& p = problems[i];
    if (p.m == 0 || p.n == 0) continue;
    if (p.k == 0) {  // C = beta C: gemm's plain call (the experts never pass one)
      gemm<float>(p.trans_a, p.trans_b, p.m, p.n, p.k, p.alpha, p.a, p.lda, p.b, p.ldb, p.beta, p.c,
                  p.ldc);
      continue;
    }
    if (last == nullptr || !same_group(*last, p)) {
      op_first.push_back(p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N);
      op_second.push_back(p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N);
      rows.push_back(p.n);
      cols.push_back(p.m);
      inner.push_back(p.k);
      ld_first.push_back(p.ldb);
      ld_second.push_back(p.lda);
      ld_c.push_back(p.ldc);
      alpha.push_back(p.alpha);
      beta.push_back(p.beta);
      group_size.push_back(0);
    }
    ++group_size.back();
    last = &p;
    charge_gemm_flops(2ull * p.m * p.n * p.k);  // as gemm would have charged it
    // cuBLAS only reads A and B; its pointer arrays are of void*.
    first.push_back(const_cast<float*>(p.b));
    second.push_back(const_cast<float*>(p.a));
    c.push_back(p.c);
  }
  if (group_size.empty()) return;
  // One device block [cuBLAS's A pointers | B pointers | C pointers], problem order within each.
  const size_t products = c.size();
  std::vector<void*> pointers;
  pointers.reserve(3 * products);
  pointers.insert(pointers.end(), first.begin(), first.end());
  pointers.insert(pointers.end(), second.begin(), second.end());
  pointers.insert(pointers.end(), c.begin(), c.end());
  void** device = grouped_pointers(pointers.size());
  copy_pointers_to_device(device, pointers);
  // The scalars, sizes and leading dimensions are host arrays (the handle's pointer mode is the
  // default, host), read during the call; only the three pointer arrays are read on the device.
  LOOPMOE_CUBLAS_CHECK(cublas().cublasGemmGroupedBatchedEx(
      cublas_handle(), op_first.data(), op_second.data(), rows.data(), cols.data(), inner.data(),
      alpha.data(), device, CUDA_R_32F, ld_first.data(), device + products, CUDA_R_32F,
      ld_second.data(), beta.data(), device + 2 * products, CUDA_R_32F, ld_c.data(),
      static_cast<int>(group_size.size()), group_size.data(), CUBLAS_COMPUTE_32F));
}

}  // namespace kernel_util

}  // namespace loopmoe::model::ops::cuda
