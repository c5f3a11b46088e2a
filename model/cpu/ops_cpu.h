// The CPU backend of model/ops.h: the same functions with the same signatures in namespace
// loopmoe::model::ops::cpu, on host memory (model/cpu/ops_*.cc; OpenMP, the batch-invariant
// sgemm), instantiated for float and double. The ops.h functions dispatch here when the default
// device (model/buffer.h) is Device::kCpu, or the host-emulated Device::kHostAsDevice that tests
// the device seam without a GPU (model/ops_dispatch.cc). The contract of each function is its
// ops.h declaration, which this list mirrors one for one, as model/cuda/ops_cuda.h does.
// Internal to model/ (and its tests): the model-level code calls ops.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "model/ops.h"

namespace loopmoe::model::ops::cpu {

template <typename T>
void tree_sum_groups(T* base, size_t stride, int groups,
                     const std::vector<std::pair<size_t, size_t>>& ranges);
template <typename T>
void gemm(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a, int lda, const T* b,
          int ldb, T beta, T* c, int ldc);
template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* wte, int S, int D);
template <typename T>
void embedding_backward(T* dwte, const T* dout, const int32_t* tokens, int S, int D);
template <typename T>
void embedding_backward(const GradGroups<T>& dwte, const T* dout, const int32_t* tokens, int D);
template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int S, int D);
template <typename T>
void rmsnorm_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight,
                      const T* rstd, int S, int D);
template <typename T>
void rmsnorm_weight_backward(const GradGroups<T>& dweight, const T* dout, const T* inp,
                             const T* rstd, int D);
template <typename T>
void matmul_forward(T* out, const T* inp, const T* w, const T* bias, int S, int I, int O);
template <typename T>
void matmul_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* inp, const T* w, int S,
                     int I, int O);
template <typename T>
void matmul_backward(T* dinp, const GradGroups<T>& dw, const GradGroups<T>* dbias, const T* dout,
                     const T* inp, const T* w, int I, int O);
template <typename T>
void silu_forward(T* out, const T* inp, size_t n);
template <typename T>
void silu_backward(T* dinp, const T* dout, const T* inp, size_t n);
template <typename T>
void adaln_modulate_forward(T* u, const T* n, const T* m, int S, int D);
template <typename T>
void adaln_modulate_backward(T* dn, T* dm, const T* du, const T* n, const T* m, int S, int D);
template <typename T>
void gated_residual_forward(T* x, const T* y, const T* m, int S, int D);
template <typename T>
void gated_residual_backward(T* dy, T* dm, const T* dx, const T* y, const T* m, int S, int D);
template <typename T>
void iteration_encoding(T* pe, int r, int dc);
template <typename T>
void rope_forward(T* qkv, const T* cos_t, const T* sin_t, int B, int T_, int H, int hd);
template <typename T>
void rope_backward(T* dqkv, const T* cos_t, const T* sin_t, int B, int T_, int H, int hd);
template <typename T>
void rope_tables(T* cos_t, T* sin_t, int T_, int hd, double theta);
template <typename T>
void attention_forward(T* out, T* att, const T* qkv, int B, int T_, int H, int hd);
template <typename T>
void attention_backward(T* dqkv, T* scratch, const T* dout, const T* qkv, const T* att, int B,
                        int T_, int H, int hd);
template <typename T>
void softmax_forward(T* probs, T* lse, const T* logits, int S, int E);
template <typename T>
void softmax_backward(T* dlogits, const T* dprobs, const T* probs, int S, int E);
template <typename T>
LossSum crossentropy_forward_sum(T* probs, const T* logits, const int32_t* targets, int S, int V);
template <typename T>
double crossentropy_forward(T* probs, const T* logits, const int32_t* targets, int S, int V);
template <typename T>
void crossentropy_backward(T* dlogits, const T* probs, const int32_t* targets, T scale, int S,
                           int V);
template <typename T>
void swiglu_forward(T* out, T* h1, T* h3, T* act, const T* x, const T* w1, const T* w3, const T* w2,
                    int n, int D, int F);
template <typename T>
void swiglu_backward(T* dx, T* dw1, T* dw3, T* dw2, T* scratch, const T* dout, const T* x,
                     const T* h1, const T* h3, const T* act, const T* w1, const T* w3, const T* w2,
                     int n, int D, int F);
template <typename T>
void experts_swiglu_forward(T* out, T* h1, T* h3, T* act, const T* x, const int64_t* offset, int E,
                            const T* w1, const T* w3, const T* w2, int D, int F);
template <typename T>
void experts_swiglu_backward(T* dx, T* dw1, T* dw3, T* dw2, T* scratch, const T* dout, const T* x,
                             const T* h1, const T* h3, const T* act, const int64_t* offset, int E,
                             const T* w1, const T* w3, const T* w2, int D, int F);
template <typename T>
void moe_permute_forward(T* rows, const T* x, const int64_t* row_of_slot, size_t slots, int k,
                         int D);
template <typename T>
void moe_permute_backward(T* dx, const T* drows, const int64_t* row_of_slot, int S, int k, int D);
template <typename T>
void moe_unpermute_forward(T* out, const T* rows, const int64_t* row_of_slot, size_t slots, int D);
template <typename T>
void moe_unpermute_backward(T* drows, const T* dout, const int64_t* row_of_slot, size_t slots,
                            int D);
template <typename T>
void gather_rows(T* dst, const T* src, const int64_t* index, int64_t rows, int D);
template <typename T>
void scatter_rows(T* dst, const T* src, const int64_t* index, int64_t rows, int D);
template <typename T>
void moe_combine_forward(T* y, const T* expert_out, const T* weight, const uint8_t* kept, int S,
                         int k, int D);
template <typename T>
void moe_combine_backward(T* dexpert_out, T* dweight, const T* dy, const T* expert_out,
                          const T* weight, const uint8_t* kept, int S, int k, int D);
template <typename T>
void router_topk_forward(int32_t* expert, T* weight, const T* probs, int S, int E, int k,
                         bool renormalize);
template <typename T>
void router_topk_backward(T* dprobs, const T* dweight, const T* probs, const int32_t* expert,
                          const T* weight, const T* bias, int S, int E, int k, bool renormalize);
template <typename T>
void router_stats(int64_t* assigned, LossSum* prob_sum, LossSum* lse_sq_sum, const int32_t* expert,
                  const T* probs, const T* lse, int S, int E, int k);
template <typename T>
void router_zloss_backward(T* dlogits, const T* probs, const T* lse, int S, int E, double z_scale,
                           double tokens);
template <typename T>
void add_row_vector(T* x, const T* v, int S, int D);
template <typename T>
void sum_rows(T* out, const T* x, int rows, int D);
template <typename T>
void add_inplace(T* dst, const T* src, size_t n);
template <typename T>
void copy_masked_rows(T* x, const T* src, const int32_t* mask, int S, int D);
template <typename T>
void halt_converged_rows(int32_t* halted_at, T* frozen, const T* prev, const T* cur, int S, int D,
                         double threshold, int iteration);
double sum_squares(const float* g, size_t n);
void scale_inplace(float* g, size_t n, float c);
void adamw_update(float* p, float* m, float* v, const float* g, const uint8_t* decay, size_t n,
                  const AdamWStep& step);

}  // namespace loopmoe::model::ops::cpu
