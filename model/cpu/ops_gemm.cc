// ops.h on the CPU, part 1: the matrix product (gemm<float> on the batch-invariant cpu/sgemm,
// gemm<double> on OpenBLAS, the naive reference) and the FLOP counters charged by every product.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <atomic>

#include "model/cpu/ops_cpu.h"
#include "model/cpu/sgemm.h"

namespace loopmoe::model::ops {
namespace {

std::atomic<uint64_t> g_gemm_flops[static_cast<int>(FlopKind::kCount)];
std::atomic<int> g_flop_kind{0};

inline void count_flops(uint64_t flops) {
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
  return g_gemm_flops[static_cast<int>(kind)].load(std::memory_order_relaxed);
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
}

FlopKindScope::FlopKindScope(FlopKind kind)
    : previous_(static_cast<FlopKind>(g_flop_kind.exchange(static_cast<int>(kind)))) {}
FlopKindScope::~FlopKindScope() { g_flop_kind.store(static_cast<int>(previous_)); }

namespace cpu {

template <>
void gemm<float>(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  if (m == 0 || n == 0) return;
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
