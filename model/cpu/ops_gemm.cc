// ops.h on the CPU, part 1: the matrix product (gemm<float> on the batch-invariant cpu/sgemm,
// in fp32 or with bf16-rounded operands; gemm<double> on OpenBLAS, the naive reference), the FLOP
// counters charged by every product and the matmul precision setting.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <vector>

#include "model/bf16.h"
#include "model/cpu/ops_cpu.h"
#include "model/cpu/sgemm.h"

namespace loopmoe::model::ops {
namespace {

std::atomic<uint64_t> g_gemm_flops[static_cast<int>(FlopKind::kCount)];
std::atomic<int> g_flop_kind{0};
std::atomic<int> g_matmul_precision{static_cast<int>(MatmulPrecision::kFp32)};

std::atomic<DeviceFlopCounter*> g_device_flops{nullptr};

thread_local bool t_recomputing = false;  // RecomputeScope

inline void count_flops(uint64_t flops) {
  if (t_recomputing) return;
  g_gemm_flops[g_flop_kind.load(std::memory_order_relaxed)].fetch_add(flops,
                                                                      std::memory_order_relaxed);
}

}  // namespace

const char* to_string(FlopKind kind) {
  switch (kind) {
    case FlopKind::kOther:
      return "other";
    case FlopKind::kAttentionProj:
      return "attention_proj";
    case FlopKind::kAttentionScores:
      return "attention_scores";
    case FlopKind::kRouter:
      return "router";
    case FlopKind::kExperts:
      return "experts";
    case FlopKind::kIterAdaLN:
      return "iter_adaln";
    case FlopKind::kHead:
      return "head";
    case FlopKind::kCount:
      break;
  }
  return "?";
}

uint64_t gemm_flops(FlopKind kind) {
  uint64_t flops = g_gemm_flops[static_cast<int>(kind)].load(std::memory_order_relaxed);
  if (DeviceFlopCounter* device = g_device_flops.load()) flops += device->read(kind);
  return flops;
}

uint64_t gemm_flops() {
  uint64_t total = 0;
  for (int k = 0; k < static_cast<int>(FlopKind::kCount); ++k) {
    total += gemm_flops(static_cast<FlopKind>(k));
  }
  return total;
}

void reset_gemm_flops() {
  for (auto& c : g_gemm_flops) c.store(0, std::memory_order_relaxed);
  if (DeviceFlopCounter* device = g_device_flops.load()) device->reset();
}

void register_device_flop_counter(DeviceFlopCounter* counter) { g_device_flops.store(counter); }

bool flops_charged_now() { return !t_recomputing; }

FlopKind current_flop_kind() {
  return static_cast<FlopKind>(g_flop_kind.load(std::memory_order_relaxed));
}

FlopKindScope::FlopKindScope(FlopKind kind)
    : previous_(static_cast<FlopKind>(g_flop_kind.exchange(static_cast<int>(kind)))) {}
FlopKindScope::~FlopKindScope() { g_flop_kind.store(static_cast<int>(previous_)); }

void charge_gemm_flops(uint64_t flops) { count_flops(flops); }

RecomputeScope::RecomputeScope() : previous_(t_recomputing) { t_recomputing = true; }
RecomputeScope::~RecomputeScope() { t_recomputing = previous_; }

const char* to_string(MatmulPrecision precision) {
  switch (precision) {
    case MatmulPrecision::kFp32:
      return "fp32";
    case MatmulPrecision::kBf16:
      return "bf16";
  }
  return "?";
}

MatmulPrecision parse_matmul_precision(const std::string& name) {
  if (name == "fp32") return MatmulPrecision::kFp32;
  if (name == "bf16") return MatmulPrecision::kBf16;
  throw std::invalid_argument("unknown precision '" + name + "' (expected fp32 or bf16)");
}

MatmulPrecision matmul_precision() {
  return static_cast<MatmulPrecision>(g_matmul_precision.load(std::memory_order_relaxed));
}

void set_matmul_precision(MatmulPrecision precision) {
  g_matmul_precision.store(static_cast<int>(precision), std::memory_order_relaxed);
}

MatmulPrecisionScope::MatmulPrecisionScope(MatmulPrecision precision)
    : previous_(matmul_precision()) {
  set_matmul_precision(precision);
}
MatmulPrecisionScope::~MatmulPrecisionScope() { set_matmul_precision(previous_); }

namespace cpu {

namespace {

void gemm_fp32(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda,
               const float* b, int ldb, float beta, float* c, int ldc) {
  count_flops(2ull * m * n * k);
  // cpu::sgemm computes every element as one fixed fma chain, so neither the split below nor the
  // number of rows in the call changes any result (docs/MODEL.md "Batch-invariant numerics").
  // Inside our parallel loops it runs single-threaded; a large product outside any parallel
  // region is split into one block of C per thread.
  const int threads = omp_in_parallel() ? 1 : omp_get_max_threads();
  if (threads == 1 || static_cast<double>(m) * n * k < 4e6) {
    cpu::sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const bool split_rows = m >= n;
  const int extent = split_rows ? m : n;
  const int chunk = ((extent + threads - 1) / threads + 15) / 16 * 16;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int t = 0; t < threads; ++t) {
    const int begin = t * chunk, len = std::min(extent, begin + chunk) - begin;
    if (len <= 0) continue;
    if (split_rows) {  // rows [begin, begin+len) of C and of op(A)
      const float* as = ta ? a + begin : a + static_cast<size_t>(begin) * lda;
      cpu::sgemm(ta, tb, len, n, k, alpha, as, lda, b, ldb, beta,
                 c + static_cast<size_t>(begin) * ldc, ldc);
    } else {  // columns [begin, begin+len) of C and of op(B)
      const float* bs = tb ? b + static_cast<size_t>(begin) * ldb : b + begin;
      cpu::sgemm(ta, tb, m, len, k, alpha, a, lda, bs, ldb, beta, c + begin, ldc);
    }
  }
}

}  // namespace

// In bf16 (ops.h MatmulPrecision) the operands are rounded into packed scratch copies first (a
// stored matrix of rows x cols with its leading dimension becomes rows x cols with leading
// dimension cols; the transpose flags stay), then multiplied by the same fp32 sgemm: the product
// of two bfloat16 values is exact in fp32, so what remains is fp32 accumulation, in sgemm's fixed
// order. The scratch is per thread (gemm runs inside parallel loops) and grows to the largest
// operand; when the product is then split over threads they only read it.
template <>
void gemm<float>(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  if (m == 0 || n == 0) return;
  if (matmul_precision() == MatmulPrecision::kFp32 || k == 0) {
    gemm_fp32(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  thread_local std::vector<float> a16, b16;
  const int a_rows = ta ? k : m, a_cols = ta ? m : k;
  const int b_rows = tb ? n : k, b_cols = tb ? k : n;
  a16.resize(static_cast<size_t>(a_rows) * a_cols);
  b16.resize(static_cast<size_t>(b_rows) * b_cols);
  round_to_bf16_packed(a, lda, a_rows, a_cols, a16.data());
  round_to_bf16_packed(b, ldb, b_rows, b_cols, b16.data());
  gemm_fp32(ta, tb, m, n, k, alpha, a16.data(), a_cols, b16.data(), b_cols, beta, c, ldc);
}

template <>
void gemm<double>(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda,
                  const double* b, int ldb, double beta, double* c, int ldc) {
  if (m == 0 || n == 0) return;
  count_flops(2ull * m * n * k);
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n,
              k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace cpu

template <typename T>
void gemm_reference(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b,
                    int ldb, T beta, T* c, int ldc) {
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      double acc = 0;
      for (int p = 0; p < k; ++p) {
        double av = ta ? a[p * lda + i] : a[i * lda + p];
        double bv = tb ? b[j * ldb + p] : b[p * ldb + j];
        acc += av * bv;
      }
      T prev = beta == T(0) ? T(0) : beta * c[i * ldc + j];
      c[i * ldc + j] = static_cast<T>(alpha * acc) + prev;
    }
  }
}

template void gemm_reference<float>(bool, bool, int, int, int, float, const float*, int,
                                    const float*, int, float, float*, int);
template void gemm_reference<double>(bool, bool, int, int, int, double, const double*, int,
                                     const double*, int, double, double*, int);

}  // namespace loopmoe::model::ops
