#include "model/ops.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "model/cpu/sgemm.h"

namespace loopmoe::ops {
namespace {

std::atomic<uint64_t> g_gemm_flops[static_cast<int>(FlopKind::kCount)];
std::atomic<int> g_flop_kind{0};

inline void count_flops(uint64_t flops) {
  g_gemm_flops[g_flop_kind.load(std::memory_order_relaxed)].fetch_add(flops,
                                                                      std::memory_order_relaxed);
}

// exp for the float hot loops: Cephes' expf polynomial (about 2 ulp), written so that the
// compiler vectorises it; libm's expf is a scalar call per element. Double keeps std::exp, so
// the gradient checks run against libm.
inline float fast_exp(float x) {
  x = std::min(88.3762626647949f, std::max(-87.3365447504f, x));
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
inline double fast_exp(double x) { return std::exp(x); }

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + fast_exp(-x));
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
  matmul_backward(dinp, GradGroups<T>::single(dw, S), dbias != nullptr ? &db : nullptr, dout, inp,
                  w, I, O);
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
  for (const auto& [offset, n] : ranges) {
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

template <typename T>
void attention_forward(T* out, T* att, const T* qkv, int B, int T_, int H, int hd) {
  const int inner = H * hd, ld = 3 * inner;
  const T scale = T(1) / std::sqrt(static_cast<T>(hd));
#pragma omp parallel for schedule(static)
  for (int bh = 0; bh < B * H; ++bh) {
    const int b = bh / H, h = bh % H;
    const T* q = qkv + static_cast<size_t>(b) * T_ * ld + h * hd;
    const T* k = q + inner;
    const T* v = q + 2 * inner;
    T* p = att + static_cast<size_t>(bh) * T_ * T_;
    gemm<T>(false, true, T_, T_, hd, scale, q, ld, k, ld, T(0), p, T_);
    for (int t = 0; t < T_; ++t) {
      T* row = p + static_cast<size_t>(t) * T_;
      T mx = row[0];
      for (int s = 1; s <= t; ++s) mx = std::max(mx, row[s]);
      T sum = 0;
      for (int s = 0; s <= t; ++s) {
        row[s] = fast_exp(row[s] - mx);
        sum += row[s];
      }
      T inv = T(1) / sum;
      for (int s = 0; s <= t; ++s) row[s] *= inv;
      for (int s = t + 1; s < T_; ++s) row[s] = T(0);
    }
    gemm<T>(false, false, T_, hd, T_, T(1), p, T_, v, ld, T(0),
            out + static_cast<size_t>(b) * T_ * inner + h * hd, inner);
  }
}

template <typename T>
void attention_backward(T* dqkv, T* scratch, const T* dout, const T* qkv, const T* att, int B,
                        int T_, int H, int hd) {
  const int inner = H * hd, ld = 3 * inner;
  const T scale = T(1) / std::sqrt(static_cast<T>(hd));
#pragma omp parallel for schedule(static)
  for (int bh = 0; bh < B * H; ++bh) {
    const int b = bh / H, h = bh % H;
    const size_t base = static_cast<size_t>(b) * T_ * ld + h * hd;
    const T* q = qkv + base;
    const T* k = q + inner;
    const T* v = q + 2 * inner;
    T* dq = dqkv + base;
    T* dk = dq + inner;
    T* dv = dq + 2 * inner;
    const T* p = att + static_cast<size_t>(bh) * T_ * T_;
    const T* g = dout + static_cast<size_t>(b) * T_ * inner + h * hd;
    T* dp = scratch + static_cast<size_t>(omp_get_thread_num()) * T_ * T_;
    gemm<T>(false, true, T_, T_, hd, T(1), g, inner, v, ld, T(0), dp, T_);  // dP = dO V^T
    gemm<T>(true, false, T_, hd, T_, T(1), p, T_, g, inner, T(0), dv, ld);  // dV = P^T dO
    for (int t = 0; t < T_; ++t) {  // dS = P ⊙ (dP − rowsum(dP ⊙ P)); masked entries have P = 0
      const T* pr = p + static_cast<size_t>(t) * T_;
      T* dr = dp + static_cast<size_t>(t) * T_;
      T dot = 0;
      for (int s = 0; s <= t; ++s) dot += dr[s] * pr[s];
      for (int s = 0; s <= t; ++s) dr[s] = pr[s] * (dr[s] - dot);
      for (int s = t + 1; s < T_; ++s) dr[s] = T(0);
    }
    gemm<T>(false, false, T_, hd, T_, scale, dp, T_, k, ld, T(0), dq, ld);  // dQ = s·dS K
    gemm<T>(true, false, T_, hd, T_, scale, dp, T_, q, ld, T(0), dk, ld);   // dK = s·dS^T Q
  }
}

template <typename T>
void softmax_forward(T* probs, T* lse, const T* logits, int S, int E) {
#pragma omp parallel for schedule(static)
  for (int s = 0; s < S; ++s) {
    const T* l = logits + static_cast<size_t>(s) * E;
    T* p = probs + static_cast<size_t>(s) * E;
    T mx = *std::max_element(l, l + E);
    T sum = 0;
    for (int e = 0; e < E; ++e) {
      p[e] = fast_exp(l[e] - mx);
      sum += p[e];
    }
    for (int e = 0; e < E; ++e) p[e] /= sum;
    lse[s] = mx + std::log(sum);
  }
}

template <typename T>
void softmax_backward(T* dlogits, const T* dprobs, const T* probs, int S, int E) {
#pragma omp parallel for schedule(static)
  for (int s = 0; s < S; ++s) {
    const T* dp = dprobs + static_cast<size_t>(s) * E;
    const T* p = probs + static_cast<size_t>(s) * E;
    T* dl = dlogits + static_cast<size_t>(s) * E;
    T dot = 0;
    for (int e = 0; e < E; ++e) dot += dp[e] * p[e];
    for (int e = 0; e < E; ++e) dl[e] = p[e] * (dp[e] - dot);
  }
}

void LossSum::add_row(double loss) {
  if (!(std::abs(loss) < 0x1p20)) {  // also catches NaN
    ++invalid;
    return;
  }
  const int64_t row = static_cast<int64_t>(std::nearbyint(loss * (1.0 / kUnit)));
  if (__builtin_add_overflow(units, row, &units)) ++invalid;
}

void LossSum::add(const LossSum& other) {
  invalid += other.invalid;
  if (__builtin_add_overflow(units, other.units, &units)) ++invalid;
}

double LossSum::value() const {
  return invalid > 0 ? std::numeric_limits<double>::quiet_NaN()
                     : static_cast<double>(units) * kUnit;
}

// Softmax of each row into probs; returns each row's loss.
template <typename T>
std::vector<double> crossentropy_rows(T* probs, const T* logits, const int32_t* targets, int S,
                                      int V) {
  std::vector<double> losses(S);
#pragma omp parallel for schedule(static)
  for (int s = 0; s < S; ++s) {
    const T* l = logits + static_cast<size_t>(s) * V;
    T* p = probs + static_cast<size_t>(s) * V;
    T mx = *std::max_element(l, l + V);
    T sum = 0;
    for (int v = 0; v < V; ++v) {
      p[v] = fast_exp(l[v] - mx);
      sum += p[v];
    }
    T inv = T(1) / sum;
    for (int v = 0; v < V; ++v) p[v] *= inv;
    losses[s] = -(static_cast<double>(l[targets[s]]) - mx - std::log(static_cast<double>(sum)));
  }
  return losses;
}

template <typename T>
double crossentropy_forward(T* probs, const T* logits, const int32_t* targets, int S, int V) {
  double total = 0;
  for (double x : crossentropy_rows(probs, logits, targets, S, V)) total += x;
  return total / S;
}

template <typename T>
LossSum crossentropy_forward_sum(T* probs, const T* logits, const int32_t* targets, int S, int V) {
  LossSum total;
  for (double x : crossentropy_rows(probs, logits, targets, S, V)) total.add_row(x);
  return total;
}

template <typename T>
void crossentropy_backward(T* dlogits, const T* probs, const int32_t* targets, T scale, int S,
                           int V) {
#pragma omp parallel for schedule(static)
  for (int s = 0; s < S; ++s) {
    const T* p = probs + static_cast<size_t>(s) * V;
    T* d = dlogits + static_cast<size_t>(s) * V;
    for (int v = 0; v < V; ++v) d[v] = p[v] * scale;
    d[targets[s]] -= scale;
  }
}

template <typename T>
void swiglu_forward(T* out, T* h1, T* h3, T* act, const T* x, const T* w1, const T* w3, const T* w2,
                    int n, int D, int F) {
  if (n == 0) return;
  gemm<T>(false, false, n, F, D, T(1), x, D, w1, F, T(0), h1, F);
  gemm<T>(false, false, n, F, D, T(1), x, D, w3, F, T(0), h3, F);
  const size_t nf = static_cast<size_t>(n) * F;
  for (size_t i = 0; i < nf; ++i) act[i] = h1[i] * sigmoid(h1[i]) * h3[i];
  gemm<T>(false, false, n, D, F, T(1), act, F, w2, D, T(0), out, D);
}

template <typename T>
void swiglu_backward(T* dx, T* dw1, T* dw3, T* dw2, T* scratch, const T* dout, const T* x,
                     const T* h1, const T* h3, const T* act, const T* w1, const T* w3, const T* w2,
                     int n, int D, int F) {
  if (n == 0) return;
  const size_t nf = static_cast<size_t>(n) * F;
  T* dh1 = scratch;
  T* dh3 = scratch + nf;
  gemm<T>(true, false, F, D, n, T(1), act, F, dout, D, T(1), dw2, D);  // dW2 += act^T dout
  gemm<T>(false, true, n, F, D, T(1), dout, D, w2, D, T(0), dh1, F);   // dact = dout W2^T
  for (size_t i = 0; i < nf; ++i) {
    T sg = sigmoid(h1[i]);
    T dact = dh1[i];
    dh3[i] = dact * h1[i] * sg;
    dh1[i] = dact * h3[i] * sg * (T(1) + h1[i] * (T(1) - sg));
  }
  gemm<T>(true, false, D, F, n, T(1), x, D, dh1, F, T(1), dw1, F);
  gemm<T>(true, false, D, F, n, T(1), x, D, dh3, F, T(1), dw3, F);
  gemm<T>(false, true, n, D, F, T(1), dh1, F, w1, F, T(0), dx, D);
  gemm<T>(false, true, n, D, F, T(1), dh3, F, w3, F, T(1), dx, D);
}

#define LOOPMOE_INSTANTIATE(T)                                                                   \
  template void gemm_reference<T>(bool, bool, int, int, int, T, const T*, int, const T*, int, T, \
                                  T*, int);                                                      \
  template void embedding_forward<T>(T*, const int32_t*, const T*, int, int);                    \
  template void embedding_backward<T>(T*, const T*, const int32_t*, int, int);                   \
  template void embedding_backward<T>(const GradGroups<T>&, const T*, const int32_t*, int);      \
  template void rmsnorm_weight_backward<T>(const GradGroups<T>&, const T*, const T*, const T*,   \
                                           int);                                                 \
  template void matmul_backward<T>(T*, const GradGroups<T>&, const GradGroups<T>*, const T*,     \
                                   const T*, const T*, int, int);                                \
  template void tree_sum_groups<T>(T*, size_t, int,                                              \
                                   const std::vector<std::pair<size_t, size_t>>&);               \
  template void rmsnorm_forward<T>(T*, T*, const T*, const T*, int, int);                        \
  template void rmsnorm_backward<T>(T*, T*, const T*, const T*, const T*, const T*, int, int);   \
  template void matmul_forward<T>(T*, const T*, const T*, const T*, int, int, int);              \
  template void matmul_backward<T>(T*, T*, T*, const T*, const T*, const T*, int, int, int);     \
  template void silu_forward<T>(T*, const T*, size_t);                                           \
  template void silu_backward<T>(T*, const T*, const T*, size_t);                                \
  template void adaln_modulate_forward<T>(T*, const T*, const T*, int, int);                     \
  template void adaln_modulate_backward<T>(T*, T*, const T*, const T*, const T*, int, int);      \
  template void gated_residual_forward<T>(T*, const T*, const T*, int, int);                     \
  template void gated_residual_backward<T>(T*, T*, const T*, const T*, const T*, int, int);      \
  template void iteration_encoding<T>(T*, int, int);                                             \
  template void rope_forward<T>(T*, const T*, const T*, int, int, int, int);                     \
  template void rope_backward<T>(T*, const T*, const T*, int, int, int, int);                    \
  template void rope_tables<T>(T*, T*, int, int, double);                                        \
  template void attention_forward<T>(T*, T*, const T*, int, int, int, int);                      \
  template void attention_backward<T>(T*, T*, const T*, const T*, const T*, int, int, int, int); \
  template void softmax_forward<T>(T*, T*, const T*, int, int);                                  \
  template void softmax_backward<T>(T*, const T*, const T*, int, int);                           \
  template double crossentropy_forward<T>(T*, const T*, const int32_t*, int, int);               \
  template LossSum crossentropy_forward_sum<T>(T*, const T*, const int32_t*, int, int);          \
  template void crossentropy_backward<T>(T*, const T*, const int32_t*, T, int, int);             \
  template void swiglu_forward<T>(T*, T*, T*, T*, const T*, const T*, const T*, const T*, int,   \
                                  int, int);                                                     \
  template void swiglu_backward<T>(T*, T*, T*, T*, T*, const T*, const T*, const T*, const T*,   \
                                   const T*, const T*, const T*, const T*, int, int, int);

LOOPMOE_INSTANTIATE(float)
LOOPMOE_INSTANTIATE(double)

}  // namespace loopmoe::ops
