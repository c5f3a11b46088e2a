// Batch-invariant sgemm (model/cpu/sgemm.h has the contract).
//
// Structure (Goto/BLIS): C is cut into blocks of kNc columns, K into blocks of kKc values; each
// (column block, K block) of op(B) is packed into panels of NR columns, and a register-blocked
// micro-kernel (sgemm_kernel.h) computes one tile of C from an A strip read in place and one
// panel. Between K blocks a tile's raw accumulators are parked in memory and reloaded (a float
// store is exact), so every element's dot product stays one fma chain k = 0 .. K-1 and no block
// size, edge or thread split changes its rounding. Edge tiles use a kernel instantiated for
// exactly their rows and column vectors (masked loads and stores), not different arithmetic.
//
// The files of this kernel are compiled with -ffp-contract=off: the epilogue's alpha·acc + beta·C
// must stay two products and an add in every kernel and in the reference.
#include "model/cpu/sgemm.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <vector>

#include "model/cpu/sgemm_micro.h"

namespace loopmoe::model::ops::cpu {
namespace {

// Block sizes: a K block of kKc values keeps one packed B panel (kKc × NR) in L1 and the A rows
// of a row block (kMc × kKc) in L1/L2 across all panels; a packed B block (kKc × kNc) sits in L2.
// (Measured on the 12-row AVX-512 kernel; a smaller row block kept A's rows hot across panels.)
constexpr int kKc = 256, kMc = 48, kNc = 1024;
// Up to this many rows, whole panels of a row-major B are read in place instead of packed.
constexpr int kInPlaceRows = 256;

// Packs columns [j0, j0 + cols) of op(B) for K values [0, kc) of the block at b as panels of nr
// columns: panel p holds op(B)[k, j0 + p·nr + c] at [p][k][c]. Columns past n are zero.
void pack_b(float* dst, int nr, bool tb, const float* b, int ldb, int j0, int cols, int n, int kc) {
  for (int p = 0; p < cols; p += nr) {
    float* panel = dst + static_cast<size_t>(p) * kc;
    const int valid = std::min(nr, n - (j0 + p));
    if (!tb) {  // op(B)[k, j] = b[k·ldb + j]: nr consecutive values per k
      for (int k = 0; k < kc; ++k) {
        const float* src = b + static_cast<size_t>(k) * ldb + j0 + p;
        float* d = panel + static_cast<size_t>(k) * nr;
        // A plain loop, not std::copy_n: a memmove call per 32 floats cost 5% of a training step.
        for (int c = 0; c < valid; ++c) d[c] = src[c];
        for (int c = valid; c < nr; ++c) d[c] = 0.f;
      }
    } else {  // op(B)[k, j] = b[j·ldb + k]: transpose 8 values of k at a time per column
      int k = 0;
      for (; k + 8 <= kc; k += 8) {
        for (int c = 0; c < valid; ++c) {
          const float* src = b + static_cast<size_t>(j0 + p + c) * ldb + k;
          for (int q = 0; q < 8; ++q) panel[static_cast<size_t>(k + q) * nr + c] = src[q];
        }
      }
      for (; k < kc; ++k) {
        for (int c = 0; c < valid; ++c) {
          panel[static_cast<size_t>(k) * nr + c] = b[static_cast<size_t>(j0 + p + c) * ldb + k];
        }
      }
      for (int k2 = 0; k2 < kc; ++k2) {
        std::fill(panel + static_cast<size_t>(k2) * nr + valid,
                  panel + static_cast<size_t>(k2 + 1) * nr, 0.f);
      }
    }
  }
}

// Packs rows [0, rows) of op(A) = A^T (A at a, k-major with stride lda) for kc values of k as
// strips of mr rows: strip s holds op(A)[s·mr + r, k] at [s][k][r] (a short last strip is not
// padded: its kernel reads only its rows).
void pack_a_transposed(float* dst, int mr, const float* a, int lda, int rows, int kc) {
  for (int s = 0; s < rows; s += mr) {
    const int valid = std::min(mr, rows - s);
    float* strip = dst + static_cast<size_t>(s) * kc;
    for (int k = 0; k < kc; ++k) {
      const float* src = a + static_cast<size_t>(k) * lda + s;
      float* d = strip + static_cast<size_t>(k) * mr;
      for (int r = 0; r < valid; ++r) d[r] = src[r];
    }
  }
}

void drive(const MicroTable& t, bool ta, bool tb, int m, int n, int K, float alpha, const float* a,
           int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  const int mr = t.mr, nr = t.nv * t.width;
  thread_local std::vector<float> a_pack, b_pack, part;
  const int kc_max = std::min(std::max(K, 1), kKc);
  const int nc = std::min(kNc / nr * nr, (n + nr - 1) / nr * nr);
  b_pack.resize(static_cast<size_t>(nc) * kc_max);
  // A transposed is read k-major in place: a strip's kc values of k are rows of A lda apart.
  // When lda is a multiple of 1024 floats those rows all fall in one L1 set and evict each
  // other, so then each row block's strips are packed contiguously once for all panels.
  const bool pack_a = ta && lda % 1024 == 0 && n > nr;
  if (pack_a) a_pack.resize(static_cast<size_t>(kMc) * kc_max);
  // Raw chains of the current column block between K blocks (only when K is split).
  if (K > kKc) part.resize(static_cast<size_t>(m) * nc);
  // Few rows reuse each B panel only a few times: packing B would cost about as much as the
  // product, so whole panels of a row-major B are read in place (rows ldb apart).
  const bool b_in_place = !tb && m <= kInPlaceRows;
  MicroArgs x;
  x.ldp = nc;
  x.alpha = alpha;
  x.beta = beta;
  x.ldc = ldc;
  for (int j0 = 0; j0 < n; j0 += nc) {
    const int cols = std::min(nc, n - j0), cols_padded = (cols + nr - 1) / nr * nr;
    for (int p0 = 0; p0 < std::max(K, 1); p0 += kKc) {
      x.kc = std::min(kKc, K - p0);
      x.resume = p0 > 0;
      x.final = p0 + kKc >= K;
      const float* b_block = tb ? b + p0 : b + static_cast<size_t>(p0) * ldb;
      const int full_cols = cols / nr * nr;  // columns in whole panels
      if (!b_in_place) {
        pack_b(b_pack.data(), nr, tb, b_block, ldb, j0, cols_padded, n, x.kc);
      } else if (full_cols < cols) {  // only the zero-padded edge panel, at the buffer's start
        pack_b(b_pack.data(), nr, tb, b_block, ldb, j0 + full_cols, nr, n, x.kc);
      }
      // op(A)'s strip of rows [i, i + mr), K block p0: row-major in place when A is not
      // transposed, k-major (in place, or packed when pack_a) when it is.
      const float* a_block = ta ? a + static_cast<size_t>(p0) * lda : a + p0;
      for (int i0 = 0; i0 < m; i0 += kMc) {
        const int rows = std::min(kMc, m - i0);
        if (pack_a) pack_a_transposed(a_pack.data(), mr, a_block + i0, lda, rows, x.kc);
        for (int jr = 0; jr < cols; jr += nr) {
          const bool read_in_place = b_in_place && jr < full_cols;
          const float* bp = read_in_place ? b_block + j0 + jr
                            : b_in_place  ? b_pack.data()
                                          : b_pack.data() + static_cast<size_t>(jr) * x.kc;
          x.panel = read_in_place ? ldb : nr;
          const int tile_cols = std::min(nr, cols - jr),
                    vectors = (tile_cols + t.width - 1) / t.width;
          for (int ir = 0; ir < rows; ir += mr) {
            const int i = i0 + ir, tile_rows = std::min(mr, rows - ir);
            float* part_tile = K > kKc ? part.data() + static_cast<size_t>(i) * nc + jr : nullptr;
            float* c_tile = c + static_cast<size_t>(i) * ldc + j0 + jr;
            const MicroKernel kernel = t.kernel[tile_rows - 1][vectors - 1][ta ? 0 : 1];
            if (pack_a) {
              kernel(x, a_pack.data() + static_cast<size_t>(ir) * x.kc, mr, bp, c_tile, part_tile,
                     tile_cols);
            } else if (ta) {
              kernel(x, a_block + i, lda, bp, c_tile, part_tile, tile_cols);
            } else {
              kernel(x, a_block + static_cast<size_t>(i) * lda, lda, bp, c_tile, part_tile,
                     tile_cols);
            }
          }
        }
      }
    }
  }
}

enum class Kind { kAvx512, kAvx2, kPortable };

bool cpu_can_run(Kind kind) {
  switch (kind) {
    case Kind::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
    case Kind::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Kind::kPortable:
      return true;
  }
  return false;
}

Kind best_kind() {
  if (cpu_can_run(Kind::kAvx512)) return Kind::kAvx512;
  if (cpu_can_run(Kind::kAvx2)) return Kind::kAvx2;
  return Kind::kPortable;
}

Kind g_kind = best_kind();

const MicroTable& table(Kind kind) {
  switch (kind) {
    case Kind::kAvx512:
      return avx512_micro_table();
    case Kind::kAvx2:
      return avx2_micro_table();
    case Kind::kPortable:
      break;
  }
  return portable_micro_table();
}

}  // namespace

void sgemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda,
           const float* b, int ldb, float beta, float* c, int ldc) {
  if (m <= 0 || n <= 0) return;
  drive(table(g_kind), ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void sgemm_reference(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda,
                     const float* b, int ldb, float beta, float* c, int ldc) {
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      float acc = 0.f;
      for (int p = 0; p < k; ++p) {
        const float av =
            ta ? a[static_cast<size_t>(p) * lda + i] : a[static_cast<size_t>(i) * lda + p];
        const float bv =
            tb ? b[static_cast<size_t>(j) * ldb + p] : b[static_cast<size_t>(p) * ldb + j];
        acc = std::fma(av, bv, acc);
      }
      float& dst = c[static_cast<size_t>(i) * ldc + j];
      dst = beta == 0.f ? alpha * acc : alpha * acc + beta * dst;
    }
  }
}

const char* sgemm_kernel_name() {
  switch (g_kind) {
    case Kind::kAvx512:
      return "avx512";
    case Kind::kAvx2:
      return "avx2";
    case Kind::kPortable:
      return "portable";
  }
  return "?";
}

bool sgemm_force_kernel(const char* name) {
  Kind kind;
  if (std::strcmp(name, "avx512") == 0) {
    kind = Kind::kAvx512;
  } else if (std::strcmp(name, "avx2") == 0) {
    kind = Kind::kAvx2;
  } else if (std::strcmp(name, "portable") == 0) {
    kind = Kind::kPortable;
  } else {
    return false;
  }
  if (!cpu_can_run(kind)) return false;
  g_kind = kind;
  return true;
}

}  // namespace loopmoe::model::ops::cpu
