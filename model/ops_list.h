// The one list of model/ops.h's kernels. Generated from it: the backends' declarations
// (model/cpu/ops_cpu.h, model/cuda/ops_cuda.h), the dispatchers (model/ops_dispatch.cc) and the
// explicit instantiations (model/cpu/ops_*.cc, model/cuda/ops_*.cu). ops.h stays the documented
// interface, written out by hand with its shape comments; this list is its machine-readable copy,
// and ops_dispatch.cc checks at compile time that every entry names an ops.h function of exactly
// that type (return type and parameter types).
//
// Adding a kernel: declare and document it in ops.h; add one entry below, in the family of the
// files that implement it; write it in model/cpu/ (and model/cuda/). A missing piece fails the
// build: no ops.h declaration, or a different one, fails ops_dispatch.cc's check; a missing kernel
// fails its file's explicit instantiation ("no definition available"); an ops.h function with no
// entry has no dispatcher, so its callers fail to link.
//
// One entry: X(return type, name, (parameters), (arguments), (device pointers)):
//   parameters       ops.h's parameter list, in terms of the element type T;
//   arguments        the same names, to forward the call;
//   device pointers  the arguments ops.h takes as memory on the default device (not those it marks
//                    "host"), which the dispatcher checks on the emulated test device
//                    (ops_dispatch.cc runs_on_cpu).
// The families follow the kernel files, CPU and CUDA alike (the CPU's ops_dense.cc also holds the
// embedding). gemm's backends define explicit specializations, so no file instantiates its family.
// LOOPMOE_OPS_FLOAT lists the float-only optimiser functions, which are not templates.
//
// The list is formatted by hand: clang-format reads `T* out` in a macro argument as a product and
// would write `T * out`.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "model/ops.h"

// clang-format off
// The matrix product: cpu/ops_gemm.cc, cuda/ops_gemm.cu.
#define LOOPMOE_OPS_GEMM(X, T)                                                                     \
  X(void, gemm,                                                                                    \
    (bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a, int lda, const T* b,    \
     int ldb, T beta, T* c, int ldc),                                                              \
    (trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc),                              \
    (a, b, c))

// cpu/ops_dense.cc, cuda/ops_embedding.cu.
#define LOOPMOE_OPS_EMBEDDING(X, T)                                                                \
  X(void, embedding_forward, (T* out, const int32_t* tokens, const T* wte, int S, int D),          \
    (out, tokens, wte, S, D),                                                                      \
    (out, tokens, wte))                                                                            \
  X(void, embedding_backward, (T* dwte, const T* dout, const int32_t* tokens, int S, int D),       \
    (dwte, dout, tokens, S, D),                                                                    \
    (dwte, dout, tokens))                                                                          \
  X(void, embedding_backward,                                                                      \
    (const GradGroups<T>& dwte, const T* dout, const int32_t* tokens, int D),                      \
    (dwte, dout, tokens, D),                                                                       \
    (dwte.base, dout, tokens))

// Norms, matmul, activations, IterAdaLN, RoPE, gradient groups: cpu/ops_dense.cc,
// cuda/ops_dense.cu.
#define LOOPMOE_OPS_DENSE(X, T)                                                                    \
  X(void, tree_sum_groups,                                                                         \
    (T* base, size_t stride, int groups, const std::vector<std::pair<size_t, size_t>>& ranges),    \
    (base, stride, groups, ranges),                                                                \
    (base))                                                                                        \
  X(void, rmsnorm_forward, (T* out, T* rstd, const T* inp, const T* weight, int S, int D),         \
    (out, rstd, inp, weight, S, D),                                                                \
    (out, rstd, inp, weight))                                                                      \
  X(void, rmsnorm_backward,                                                                        \
    (T* dinp, T* dweight, const T* dout, const T* inp, const T* weight, const T* rstd, int S,      \
     int D),                                                                                       \
    (dinp, dweight, dout, inp, weight, rstd, S, D),                                                \
    (dinp, dweight, dout, inp, weight, rstd))                                                      \
  X(void, rmsnorm_weight_backward,                                                                 \
    (const GradGroups<T>& dweight, const T* dout, const T* inp, const T* rstd, int D),             \
    (dweight, dout, inp, rstd, D),                                                                 \
    (dweight.base, dout, inp, rstd))                                                               \
  X(void, matmul_forward, (T* out, const T* inp, const T* w, const T* bias, int S, int I, int O),  \
    (out, inp, w, bias, S, I, O),                                                                  \
    (out, inp, w, bias))                                                                           \
  X(void, matmul_backward,                                                                         \
    (T* dinp, T* dw, T* dbias, const T* dout, const T* inp, const T* w, int S, int I, int O),      \
    (dinp, dw, dbias, dout, inp, w, S, I, O),                                                      \
    (dinp, dw, dbias, dout, inp, w))                                                               \
  X(void, matmul_backward,                                                                         \
    (T* dinp, const GradGroups<T>& dw, const GradGroups<T>* dbias, const T* dout, const T* inp,    \
     const T* w, int I, int O),                                                                    \
    (dinp, dw, dbias, dout, inp, w, I, O),                                                         \
    (dinp, dw.base, dbias != nullptr ? dbias->base : nullptr, dout, inp, w))                       \
  X(void, silu_forward, (T* out, const T* inp, size_t n),                                          \
    (out, inp, n),                                                                                 \
    (out, inp))                                                                                    \
  X(void, silu_backward, (T* dinp, const T* dout, const T* inp, size_t n),                         \
    (dinp, dout, inp, n),                                                                          \
    (dinp, dout, inp))                                                                             \
  X(void, adaln_modulate_forward, (T* u, const T* n, const T* m, int S, int D),                    \
    (u, n, m, S, D),                                                                               \
    (u, n, m))                                                                                     \
  X(void, adaln_modulate_backward,                                                                 \
    (T* dn, T* dm, const T* du, const T* n, const T* m, int S, int D),                             \
    (dn, dm, du, n, m, S, D),                                                                      \
    (dn, dm, du, n, m))                                                                            \
  X(void, gated_residual_forward, (T* x, const T* y, const T* m, int S, int D),                    \
    (x, y, m, S, D),                                                                               \
    (x, y, m))                                                                                     \
  X(void, gated_residual_backward,                                                                 \
    (T* dy, T* dm, const T* dx, const T* y, const T* m, int S, int D),                             \
    (dy, dm, dx, y, m, S, D),                                                                      \
    (dy, dm, dx, y, m))                                                                            \
  X(void, iteration_encoding, (T* pe, int r, int dc),                                              \
    (pe, r, dc),                                                                                   \
    (pe))                                                                                          \
  X(void, rope_forward, (T* qkv, const T* cos_t, const T* sin_t, int B, int T_, int H, int hd),    \
    (qkv, cos_t, sin_t, B, T_, H, hd),                                                             \
    (qkv, cos_t, sin_t))                                                                           \
  X(void, rope_backward, (T* dqkv, const T* cos_t, const T* sin_t, int B, int T_, int H, int hd),  \
    (dqkv, cos_t, sin_t, B, T_, H, hd),                                                            \
    (dqkv, cos_t, sin_t))                                                                          \
  X(void, rope_tables, (T* cos_t, T* sin_t, int T_, int hd, double theta),                         \
    (cos_t, sin_t, T_, hd, theta),                                                                 \
    (cos_t, sin_t))

// Attention, softmax, cross-entropy: cpu/ops_attention.cc, cuda/ops_attention.cu.
#define LOOPMOE_OPS_ATTENTION(X, T)                                                                \
  X(void, attention_forward,                                                                       \
    (T* out, T* lse, T* scratch, const T* qkv, int B, int T_, int H, int hd),                      \
    (out, lse, scratch, qkv, B, T_, H, hd),                                                        \
    (out, lse, scratch, qkv))                                                                      \
  X(void, attention_backward,                                                                      \
    (T* dqkv, T* scratch, const T* dout, const T* qkv, const T* out, const T* lse, int B, int T_,  \
     int H, int hd),                                                                               \
    (dqkv, scratch, dout, qkv, out, lse, B, T_, H, hd),                                            \
    (dqkv, scratch, dout, qkv, out, lse))                                                          \
  X(void, softmax_forward, (T* probs, T* lse, const T* logits, int S, int E),                      \
    (probs, lse, logits, S, E),                                                                    \
    (probs, lse, logits))                                                                          \
  X(void, softmax_backward, (T* dlogits, const T* dprobs, const T* probs, int S, int E),           \
    (dlogits, dprobs, probs, S, E),                                                                \
    (dlogits, dprobs, probs))                                                                      \
  X(LossSum, crossentropy_forward_sum,                                                             \
    (T* probs, const T* logits, const int32_t* targets, int S, int V),                             \
    (probs, logits, targets, S, V),                                                                \
    (probs, logits, targets))                                                                      \
  X(double, crossentropy_forward,                                                                  \
    (T* probs, const T* logits, const int32_t* targets, int S, int V),                             \
    (probs, logits, targets, S, V),                                                                \
    (probs, logits, targets))                                                                      \
  X(void, crossentropy_backward,                                                                   \
    (T* dlogits, const T* probs, const int32_t* targets, T scale, int S, int V),                   \
    (dlogits, probs, targets, scale, S, V),                                                        \
    (dlogits, probs, targets))

// Experts, dispatch, combine, router: cpu/ops_moe.cc, cuda/ops_moe.cu.
#define LOOPMOE_OPS_MOE(X, T)                                                                      \
  X(void, swiglu_forward,                                                                          \
    (T* out, T* h1, T* h3, T* act, const T* x, const T* w1, const T* w3, const T* w2, int n,       \
     int D, int F),                                                                                \
    (out, h1, h3, act, x, w1, w3, w2, n, D, F),                                                    \
    (out, h1, h3, act, x, w1, w3, w2))                                                             \
  X(void, swiglu_backward,                                                                         \
    (T* dx, T* dw1, T* dw3, T* dw2, T* scratch, const T* dout, const T* x, const T* h1,            \
     const T* h3, const T* act, const T* w1, const T* w3, const T* w2, int n, int D, int F),       \
    (dx, dw1, dw3, dw2, scratch, dout, x, h1, h3, act, w1, w3, w2, n, D, F),                       \
    (dx, dw1, dw3, dw2, scratch, dout, x, h1, h3, act, w1, w3, w2))                                \
  X(void, experts_swiglu_forward,                                                                  \
    (T* out, T* h1, T* h3, T* act, const T* x, const int64_t* offset, int E, int64_t rows,         \
     const T* w1, const T* w3, const T* w2, int D, int F),                                         \
    (out, h1, h3, act, x, offset, E, rows, w1, w3, w2, D, F),                                      \
    (out, h1, h3, act, x, offset, w1, w3, w2))                                                     \
  X(void, experts_swiglu_backward,                                                                 \
    (T* dx, T* dw1, T* dw3, T* dw2, T* scratch, const T* dout, const T* x, const T* h1,            \
     const T* h3, const T* act, const int64_t* offset, int E, int64_t rows, const T* w1,           \
     const T* w3, const T* w2, int D, int F),                                                      \
    (dx, dw1, dw3, dw2, scratch, dout, x, h1, h3, act, offset, E, rows, w1, w3, w2, D, F),         \
    (dx, dw1, dw3, dw2, scratch, dout, x, h1, h3, act, offset, w1, w3, w2))                        \
  X(void, moe_permute_forward,                                                                     \
    (T* rows, const T* x, const int64_t* row_of_slot, size_t slots, int k, int D),                 \
    (rows, x, row_of_slot, slots, k, D),                                                           \
    (rows, x, row_of_slot))                                                                        \
  X(void, moe_permute_backward,                                                                    \
    (T* dx, const T* drows, const int64_t* row_of_slot, int S, int k, int D),                      \
    (dx, drows, row_of_slot, S, k, D),                                                             \
    (dx, drows, row_of_slot))                                                                      \
  X(void, moe_unpermute_forward,                                                                   \
    (T* out, const T* rows, const int64_t* row_of_slot, size_t slots, int D),                      \
    (out, rows, row_of_slot, slots, D),                                                            \
    (out, rows, row_of_slot))                                                                      \
  X(void, moe_unpermute_backward,                                                                  \
    (T* drows, const T* dout, const int64_t* row_of_slot, size_t slots, int D),                    \
    (drows, dout, row_of_slot, slots, D),                                                          \
    (drows, dout, row_of_slot))                                                                    \
  X(void, gather_rows, (T* dst, const T* src, const int64_t* index, int64_t rows, int D),          \
    (dst, src, index, rows, D),                                                                    \
    (dst, src, index))                                                                             \
  X(void, scatter_rows, (T* dst, const T* src, const int64_t* index, int64_t rows, int D),         \
    (dst, src, index, rows, D),                                                                    \
    (dst, src, index))                                                                             \
  X(void, moe_combine_forward,                                                                     \
    (T* y, const T* expert_out, const T* weight, const uint8_t* kept, int S, int k, int D),        \
    (y, expert_out, weight, kept, S, k, D),                                                        \
    (y, expert_out, weight, kept))                                                                 \
  X(void, moe_combine_backward,                                                                    \
    (T* dexpert_out, T* dweight, const T* dy, const T* expert_out, const T* weight,                \
     const uint8_t* kept, int S, int k, int D),                                                    \
    (dexpert_out, dweight, dy, expert_out, weight, kept, S, k, D),                                 \
    (dexpert_out, dweight, dy, expert_out, weight, kept))                                          \
  X(void, router_topk_forward,                                                                     \
    (int32_t* expert, T* weight, const T* probs, int S, int E, int k, bool renormalize),           \
    (expert, weight, probs, S, E, k, renormalize),                                                 \
    (expert, weight, probs))                                                                       \
  X(void, router_topk_backward,                                                                    \
    (T* dprobs, const T* dweight, const T* probs, const int32_t* expert, const T* weight,          \
     const T* bias, int S, int E, int k, bool renormalize),                                        \
    (dprobs, dweight, probs, expert, weight, bias, S, E, k, renormalize),                          \
    (dprobs, dweight, probs, expert, weight, bias))                                                \
  X(void, router_stats,                                                                            \
    (int64_t* assigned, LossSum* prob_sum, LossSum* lse_sq_sum, const int32_t* expert,             \
     const T* probs, const T* lse, int S, int E, int k),                                           \
    (assigned, prob_sum, lse_sq_sum, expert, probs, lse, S, E, k),                                 \
    (assigned, prob_sum, lse_sq_sum, expert, probs, lse))                                          \
  X(void, router_balance_bias,                                                                     \
    (T* bias, const int64_t* assigned, int E, int k, double tokens, double aux_scale),             \
    (bias, assigned, E, k, tokens, aux_scale),                                                     \
    (bias, assigned))                                                                              \
  X(void, router_zloss_backward,                                                                   \
    (T* dlogits, const T* probs, const T* lse, int S, int E, double z_scale, double tokens),       \
    (dlogits, probs, lse, S, E, z_scale, tokens),                                                  \
    (dlogits, probs, lse))

// Elementwise and row utilities (no fast-math): cpu/ops_strict.cc, cuda/ops_strict.cu.
#define LOOPMOE_OPS_STRICT(X, T)                                                                   \
  X(void, add_row_vector, (T* x, const T* v, int S, int D),                                        \
    (x, v, S, D),                                                                                  \
    (x, v))                                                                                        \
  X(void, sum_rows, (T* out, const T* x, int rows, int D),                                         \
    (out, x, rows, D),                                                                             \
    (out, x))                                                                                      \
  X(void, add_inplace, (T* dst, const T* src, size_t n),                                           \
    (dst, src, n),                                                                                 \
    (dst, src))                                                                                    \
  X(void, copy_masked_rows, (T* x, const T* src, const int32_t* mask, int S, int D),               \
    (x, src, mask, S, D),                                                                          \
    (x, src, mask))                                                                                \
  X(void, halt_converged_rows,                                                                     \
    (int32_t* halted_at, T* frozen, const T* prev, const T* cur, int S, int D, double threshold,   \
     int iteration),                                                                               \
    (halted_at, frozen, prev, cur, S, D, threshold, iteration),                                    \
    (halted_at, frozen, prev, cur))

// The functions that are not templates: the optimiser on the flat float parameter buffer
// (cpu/ops_strict.cc, cuda/ops_strict.cu) and the MoE row layout, integers only (cpu/ops_moe.cc,
// cuda/ops_moe.cu).
#define LOOPMOE_OPS_FLOAT(X)                                                                       \
  X(double, sum_squares, (const float* g, size_t n),                                               \
    (g, n),                                                                                        \
    (g))                                                                                           \
  X(void, scale_inplace, (float* g, size_t n, float c),                                            \
    (g, n, c),                                                                                     \
    (g))                                                                                           \
  X(void, adamw_update,                                                                            \
    (float* p, float* m, float* v, const float* g, const uint8_t* decay, size_t n,                 \
     const AdamWStep& step),                                                                       \
    (p, m, v, g, decay, n, step),                                                                  \
    (p, m, v, g, decay))                                                                           \
  X(void, moe_rows_by_expert,                                                                      \
    (int64_t* row_of_slot, int64_t* offset, const int32_t* expert, const uint8_t* kept,            \
     const int64_t* received, size_t slots, int E),                                                \
    (row_of_slot, offset, expert, kept, received, slots, E),                                       \
    (row_of_slot, offset, expert, kept, received))                                                 \
  X(void, moe_capacity_keep,                                                                       \
    (uint8_t* kept, int64_t* received, const int32_t* expert, const int64_t* preceding,            \
     int64_t capacity, size_t slots, int E),                                                       \
    (kept, received, expert, preceding, capacity, slots, E),                                       \
    (kept, received, expert, preceding))

// Every templated kernel: the dispatchers and declarations cover all of them.
#define LOOPMOE_OPS(X, T)                                                                          \
  LOOPMOE_OPS_GEMM(X, T)                                                                           \
  LOOPMOE_OPS_EMBEDDING(X, T)                                                                      \
  LOOPMOE_OPS_DENSE(X, T)                                                                          \
  LOOPMOE_OPS_ATTENTION(X, T)                                                                      \
  LOOPMOE_OPS_MOE(X, T)                                                                            \
  LOOPMOE_OPS_STRICT(X, T)
// clang-format on

// (a, b, c) -> a, b, c: an entry's parenthesised list spliced into a braced list.
#define LOOPMOE_OPS_UNPAREN(...) __VA_ARGS__

// A backend's declarations, in its namespace: LOOPMOE_OPS(LOOPMOE_OPS_DECLARE, T) and
// LOOPMOE_OPS_FLOAT(LOOPMOE_OPS_DECLARE_FLOAT).
#define LOOPMOE_OPS_DECLARE(ret, name, params, args, device_pointers) \
  template <typename T>                                               \
  ret name params;
#define LOOPMOE_OPS_DECLARE_FLOAT(ret, name, params, args, device_pointers) ret name params;

// Explicit instantiation of one family in the file that defines its kernels, e.g.
// LOOPMOE_OPS_DENSE(LOOPMOE_OPS_INSTANTIATE, float). T is deduced from the parameters (every
// templated kernel takes a T pointer, a T value or GradGroups<T>).
#define LOOPMOE_OPS_INSTANTIATE(ret, name, params, args, device_pointers) template ret name params;
