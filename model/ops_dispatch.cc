// The ops.h functions: each one sends its call to the backend of the process's default device
// (model/buffer.h default_device()): Device::kCpu to the CPU kernels (model/cpu/, ops_cpu.h),
// Device::kCuda to the CUDA kernels (model/cuda/, ops_cuda.h; float only, and only in a build with
// LOOPMOE_HAVE_CUDA), and the test-only Device::kHostAsDevice to the CPU kernels after checking
// that every pointer the kernel takes as device memory lies in a Buffer of that emulated device
// (a host vector handed to a kernel would be a host pointer on a real GPU).
//
// The CPU kernels keep their own files and compile flags (model/CMakeLists.txt); this file has
// none of those flags and no arithmetic, so the CPU results are those of a direct call, bit for
// bit. Generated in shape from ops_cpu.h: one function per declaration, same order.
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "model/buffer.h"
#include "model/cpu/ops_cpu.h"
#include "model/ops.h"
#if defined(LOOPMOE_HAVE_CUDA)
#include "model/cuda/ops_cuda.h"
#endif

namespace loopmoe::model::ops {
namespace {

#if defined(LOOPMOE_HAVE_CUDA)
[[noreturn]] void no_double_on_cuda(const char* op) {
  throw std::logic_error(
      std::string("ops::") + op +
      ": the CUDA backend is float only (double is for the CPU gradient checks)");
}
// A call for the CUDA backend: float goes to ops::cuda; double never gets here (runs_on_cpu
// throws first) but must compile.
#define LOOPMOE_CUDA_CALL(T, name, args)    \
  if constexpr (std::is_same_v<T, float>) { \
    return cuda::name args;                 \
  } else {                                  \
    no_double_on_cuda(#name);               \
  }
#else
[[noreturn]] void no_cuda_backend(const char* op) {
  throw std::runtime_error(std::string("ops::") + op +
                           ": the default device is CUDA but this build of LoopMoE has no CUDA "
                           "backend (configure with -DLOOPMOE_CUDA=ON)");
}
#define LOOPMOE_CUDA_CALL(T, name, args) no_cuda_backend(#name)
#endif

// Whether this call runs the CPU kernel. `device_pointers`: the arguments that ops.h takes as
// device memory (not those marked "host"); checked on the emulated device only, so kCpu pays one
// load and one compare.
template <typename T>
bool runs_on_cpu(const char* op, std::initializer_list<const void*> device_pointers) {
  switch (default_device()) {
    case Device::kCpu:
      return true;
    case Device::kHostAsDevice:
      for (const void* p : device_pointers) detail::check_host_as_device_pointer(p, op);
      return true;
    case Device::kCuda:
      if constexpr (!std::is_same_v<T, float>) {
        throw std::logic_error(std::string("ops::") + op +
                               ": double on the CUDA device (the CUDA backend is float only)");
      }
      return false;
  }
  return true;
}

}  // namespace

template <typename T>
void tree_sum_groups(T* base, size_t stride, int groups,
                     const std::vector<std::pair<size_t, size_t>>& ranges) {
  if (runs_on_cpu<T>("tree_sum_groups", {base}))
    return cpu::tree_sum_groups(base, stride, groups, ranges);
  LOOPMOE_CUDA_CALL(T, tree_sum_groups, (base, stride, groups, ranges));
}

template <typename T>
void gemm(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a, int lda, const T* b,
          int ldb, T beta, T* c, int ldc) {
  if (runs_on_cpu<T>("gemm", {a, b, c}))
    return cpu::gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  LOOPMOE_CUDA_CALL(T, gemm, (trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc));
}

template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* wte, int S, int D) {
  if (runs_on_cpu<T>("embedding_forward", {out, tokens, wte}))
    return cpu::embedding_forward(out, tokens, wte, S, D);
  LOOPMOE_CUDA_CALL(T, embedding_forward, (out, tokens, wte, S, D));
}

template <typename T>
void embedding_backward(T* dwte, const T* dout, const int32_t* tokens, int S, int D) {
  if (runs_on_cpu<T>("embedding_backward", {dwte, dout, tokens}))
    return cpu::embedding_backward(dwte, dout, tokens, S, D);
  LOOPMOE_CUDA_CALL(T, embedding_backward, (dwte, dout, tokens, S, D));
}

template <typename T>
void embedding_backward(const GradGroups<T>& dwte, const T* dout, const int32_t* tokens, int D) {
  if (runs_on_cpu<T>("embedding_backward", {dwte.base, dout, tokens}))
    return cpu::embedding_backward(dwte, dout, tokens, D);
  LOOPMOE_CUDA_CALL(T, embedding_backward, (dwte, dout, tokens, D));
}

template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int S, int D) {
  if (runs_on_cpu<T>("rmsnorm_forward", {out, rstd, inp, weight}))
    return cpu::rmsnorm_forward(out, rstd, inp, weight, S, D);
  LOOPMOE_CUDA_CALL(T, rmsnorm_forward, (out, rstd, inp, weight, S, D));
}

template <typename T>
void rmsnorm_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight,
                      const T* rstd, int S, int D) {
  if (runs_on_cpu<T>("rmsnorm_backward", {dinp, dweight, dout, inp, weight, rstd}))
    return cpu::rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, S, D);
  LOOPMOE_CUDA_CALL(T, rmsnorm_backward, (dinp, dweight, dout, inp, weight, rstd, S, D));
}

template <typename T>
void rmsnorm_weight_backward(const GradGroups<T>& dweight, const T* dout, const T* inp,
                             const T* rstd, int D) {
  if (runs_on_cpu<T>("rmsnorm_weight_backward", {dweight.base, dout, inp, rstd}))
    return cpu::rmsnorm_weight_backward(dweight, dout, inp, rstd, D);
  LOOPMOE_CUDA_CALL(T, rmsnorm_weight_backward, (dweight, dout, inp, rstd, D));
}

template <typename T>
void matmul_forward(T* out, const T* inp, const T* w, const T* bias, int S, int I, int O) {
  if (runs_on_cpu<T>("matmul_forward", {out, inp, w, bias}))
    return cpu::matmul_forward(out, inp, w, bias, S, I, O);
  LOOPMOE_CUDA_CALL(T, matmul_forward, (out, inp, w, bias, S, I, O));
}

template <typename T>
void matmul_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* inp, const T* w, int S,
                     int I, int O) {
  if (runs_on_cpu<T>("matmul_backward", {dinp, dw, dbias, dout, inp, w}))
    return cpu::matmul_backward(dinp, dw, dbias, dout, inp, w, S, I, O);
  LOOPMOE_CUDA_CALL(T, matmul_backward, (dinp, dw, dbias, dout, inp, w, S, I, O));
}

template <typename T>
void matmul_backward(T* dinp, const GradGroups<T>& dw, const GradGroups<T>* dbias, const T* dout,
                     const T* inp, const T* w, int I, int O) {
  if (runs_on_cpu<T>("matmul_backward",
                     {dinp, dw.base, dbias != nullptr ? dbias->base : nullptr, dout, inp, w}))
    return cpu::matmul_backward(dinp, dw, dbias, dout, inp, w, I, O);
  LOOPMOE_CUDA_CALL(T, matmul_backward, (dinp, dw, dbias, dout, inp, w, I, O));
}

template <typename T>
void silu_forward(T* out, const T* inp, size_t n) {
  if (runs_on_cpu<T>("silu_forward", {out, inp})) return cpu::silu_forward(out, inp, n);
  LOOPMOE_CUDA_CALL(T, silu_forward, (out, inp, n));
}

template <typename T>
void silu_backward(T* dinp, const T* dout, const T* inp, size_t n) {
  if (runs_on_cpu<T>("silu_backward", {dinp, dout, inp}))
    return cpu::silu_backward(dinp, dout, inp, n);
  LOOPMOE_CUDA_CALL(T, silu_backward, (dinp, dout, inp, n));
}

template <typename T>
void adaln_modulate_forward(T* u, const T* n, const T* m, int S, int D) {
  if (runs_on_cpu<T>("adaln_modulate_forward", {u, n, m}))
    return cpu::adaln_modulate_forward(u, n, m, S, D);
  LOOPMOE_CUDA_CALL(T, adaln_modulate_forward, (u, n, m, S, D));
}

template <typename T>
void adaln_modulate_backward(T* dn, T* dm, const T* du, const T* n, const T* m, int S, int D) {
  if (runs_on_cpu<T>("adaln_modulate_backward", {dn, dm, du, n, m}))
    return cpu::adaln_modulate_backward(dn, dm, du, n, m, S, D);
  LOOPMOE_CUDA_CALL(T, adaln_modulate_backward, (dn, dm, du, n, m, S, D));
}

template <typename T>
void gated_residual_forward(T* x, const T* y, const T* m, int S, int D) {
  if (runs_on_cpu<T>("gated_residual_forward", {x, y, m}))
    return cpu::gated_residual_forward(x, y, m, S, D);
  LOOPMOE_CUDA_CALL(T, gated_residual_forward, (x, y, m, S, D));
}

template <typename T>
void gated_residual_backward(T* dy, T* dm, const T* dx, const T* y, const T* m, int S, int D) {
  if (runs_on_cpu<T>("gated_residual_backward", {dy, dm, dx, y, m}))
    return cpu::gated_residual_backward(dy, dm, dx, y, m, S, D);
  LOOPMOE_CUDA_CALL(T, gated_residual_backward, (dy, dm, dx, y, m, S, D));
}

template <typename T>
void iteration_encoding(T* pe, int r, int dc) {
  if (runs_on_cpu<T>("iteration_encoding", {pe})) return cpu::iteration_encoding(pe, r, dc);
  LOOPMOE_CUDA_CALL(T, iteration_encoding, (pe, r, dc));
}

template <typename T>
void rope_forward(T* qkv, const T* cos_t, const T* sin_t, int B, int T_, int H, int hd) {
  if (runs_on_cpu<T>("rope_forward", {qkv, cos_t, sin_t}))
    return cpu::rope_forward(qkv, cos_t, sin_t, B, T_, H, hd);
  LOOPMOE_CUDA_CALL(T, rope_forward, (qkv, cos_t, sin_t, B, T_, H, hd));
}

template <typename T>
void rope_backward(T* dqkv, const T* cos_t, const T* sin_t, int B, int T_, int H, int hd) {
  if (runs_on_cpu<T>("rope_backward", {dqkv, cos_t, sin_t}))
    return cpu::rope_backward(dqkv, cos_t, sin_t, B, T_, H, hd);
  LOOPMOE_CUDA_CALL(T, rope_backward, (dqkv, cos_t, sin_t, B, T_, H, hd));
}

template <typename T>
void rope_tables(T* cos_t, T* sin_t, int T_, int hd, double theta) {
  if (runs_on_cpu<T>("rope_tables", {cos_t, sin_t}))
    return cpu::rope_tables(cos_t, sin_t, T_, hd, theta);
  LOOPMOE_CUDA_CALL(T, rope_tables, (cos_t, sin_t, T_, hd, theta));
}

template <typename T>
void attention_forward(T* out, T* att, const T* qkv, int B, int T_, int H, int hd) {
  if (runs_on_cpu<T>("attention_forward", {out, att, qkv}))
    return cpu::attention_forward(out, att, qkv, B, T_, H, hd);
  LOOPMOE_CUDA_CALL(T, attention_forward, (out, att, qkv, B, T_, H, hd));
}

template <typename T>
void attention_backward(T* dqkv, T* scratch, const T* dout, const T* qkv, const T* att, int B,
                        int T_, int H, int hd) {
  if (runs_on_cpu<T>("attention_backward", {dqkv, scratch, dout, qkv, att}))
    return cpu::attention_backward(dqkv, scratch, dout, qkv, att, B, T_, H, hd);
  LOOPMOE_CUDA_CALL(T, attention_backward, (dqkv, scratch, dout, qkv, att, B, T_, H, hd));
}

template <typename T>
void softmax_forward(T* probs, T* lse, const T* logits, int S, int E) {
  if (runs_on_cpu<T>("softmax_forward", {probs, lse, logits}))
    return cpu::softmax_forward(probs, lse, logits, S, E);
  LOOPMOE_CUDA_CALL(T, softmax_forward, (probs, lse, logits, S, E));
}

template <typename T>
void softmax_backward(T* dlogits, const T* dprobs, const T* probs, int S, int E) {
  if (runs_on_cpu<T>("softmax_backward", {dlogits, dprobs, probs}))
    return cpu::softmax_backward(dlogits, dprobs, probs, S, E);
  LOOPMOE_CUDA_CALL(T, softmax_backward, (dlogits, dprobs, probs, S, E));
}

template <typename T>
LossSum crossentropy_forward_sum(T* probs, const T* logits, const int32_t* targets, int S, int V) {
  if (runs_on_cpu<T>("crossentropy_forward_sum", {probs, logits, targets}))
    return cpu::crossentropy_forward_sum(probs, logits, targets, S, V);
  LOOPMOE_CUDA_CALL(T, crossentropy_forward_sum, (probs, logits, targets, S, V));
}

template <typename T>
double crossentropy_forward(T* probs, const T* logits, const int32_t* targets, int S, int V) {
  if (runs_on_cpu<T>("crossentropy_forward", {probs, logits, targets}))
    return cpu::crossentropy_forward(probs, logits, targets, S, V);
  LOOPMOE_CUDA_CALL(T, crossentropy_forward, (probs, logits, targets, S, V));
}

template <typename T>
void crossentropy_backward(T* dlogits, const T* probs, const int32_t* targets, T scale, int S,
                           int V) {
  if (runs_on_cpu<T>("crossentropy_backward", {dlogits, probs, targets}))
    return cpu::crossentropy_backward(dlogits, probs, targets, scale, S, V);
  LOOPMOE_CUDA_CALL(T, crossentropy_backward, (dlogits, probs, targets, scale, S, V));
}

template <typename T>
void swiglu_forward(T* out, T* h1, T* h3, T* act, const T* x, const T* w1, const T* w3, const T* w2,
                    int n, int D, int F) {
  if (runs_on_cpu<T>("swiglu_forward", {out, h1, h3, act, x, w1, w3, w2}))
    return cpu::swiglu_forward(out, h1, h3, act, x, w1, w3, w2, n, D, F);
  LOOPMOE_CUDA_CALL(T, swiglu_forward, (out, h1, h3, act, x, w1, w3, w2, n, D, F));
}

template <typename T>
void swiglu_backward(T* dx, T* dw1, T* dw3, T* dw2, T* scratch, const T* dout, const T* x,
                     const T* h1, const T* h3, const T* act, const T* w1, const T* w3, const T* w2,
                     int n, int D, int F) {
  if (runs_on_cpu<T>("swiglu_backward",
                     {dx, dw1, dw3, dw2, scratch, dout, x, h1, h3, act, w1, w3, w2}))
    return cpu::swiglu_backward(dx, dw1, dw3, dw2, scratch, dout, x, h1, h3, act, w1, w3, w2, n, D,
                                F);
  LOOPMOE_CUDA_CALL(T, swiglu_backward,
                    (dx, dw1, dw3, dw2, scratch, dout, x, h1, h3, act, w1, w3, w2, n, D, F));
}

template <typename T>
void experts_swiglu_forward(T* out, T* h1, T* h3, T* act, const T* x, const int64_t* offset, int E,
                            const T* w1, const T* w3, const T* w2, int D, int F) {
  if (runs_on_cpu<T>("experts_swiglu_forward", {out, h1, h3, act, x, w1, w3, w2}))
    return cpu::experts_swiglu_forward(out, h1, h3, act, x, offset, E, w1, w3, w2, D, F);
  LOOPMOE_CUDA_CALL(T, experts_swiglu_forward, (out, h1, h3, act, x, offset, E, w1, w3, w2, D, F));
}

template <typename T>
void experts_swiglu_backward(T* dx, T* dw1, T* dw3, T* dw2, T* scratch, const T* dout, const T* x,
                             const T* h1, const T* h3, const T* act, const int64_t* offset, int E,
                             const T* w1, const T* w3, const T* w2, int D, int F) {
  if (runs_on_cpu<T>("experts_swiglu_backward",
                     {dx, dw1, dw3, dw2, scratch, dout, x, h1, h3, act, w1, w3, w2}))
    return cpu::experts_swiglu_backward(dx, dw1, dw3, dw2, scratch, dout, x, h1, h3, act, offset, E,
                                        w1, w3, w2, D, F);
  LOOPMOE_CUDA_CALL(
      T, experts_swiglu_backward,
      (dx, dw1, dw3, dw2, scratch, dout, x, h1, h3, act, offset, E, w1, w3, w2, D, F));
}

template <typename T>
void moe_permute_forward(T* rows, const T* x, const int64_t* row_of_slot, size_t slots, int k,
                         int D) {
  if (runs_on_cpu<T>("moe_permute_forward", {rows, x, row_of_slot}))
    return cpu::moe_permute_forward(rows, x, row_of_slot, slots, k, D);
  LOOPMOE_CUDA_CALL(T, moe_permute_forward, (rows, x, row_of_slot, slots, k, D));
}

template <typename T>
void moe_permute_backward(T* dx, const T* drows, const int64_t* row_of_slot, int S, int k, int D) {
  if (runs_on_cpu<T>("moe_permute_backward", {dx, drows, row_of_slot}))
    return cpu::moe_permute_backward(dx, drows, row_of_slot, S, k, D);
  LOOPMOE_CUDA_CALL(T, moe_permute_backward, (dx, drows, row_of_slot, S, k, D));
}

template <typename T>
void moe_unpermute_forward(T* out, const T* rows, const int64_t* row_of_slot, size_t slots, int D) {
  if (runs_on_cpu<T>("moe_unpermute_forward", {out, rows, row_of_slot}))
    return cpu::moe_unpermute_forward(out, rows, row_of_slot, slots, D);
  LOOPMOE_CUDA_CALL(T, moe_unpermute_forward, (out, rows, row_of_slot, slots, D));
}

template <typename T>
void moe_unpermute_backward(T* drows, const T* dout, const int64_t* row_of_slot, size_t slots,
                            int D) {
  if (runs_on_cpu<T>("moe_unpermute_backward", {drows, dout, row_of_slot}))
    return cpu::moe_unpermute_backward(drows, dout, row_of_slot, slots, D);
  LOOPMOE_CUDA_CALL(T, moe_unpermute_backward, (drows, dout, row_of_slot, slots, D));
}

template <typename T>
void gather_rows(T* dst, const T* src, const int64_t* index, int64_t rows, int D) {
  if (runs_on_cpu<T>("gather_rows", {dst, src, index}))
    return cpu::gather_rows(dst, src, index, rows, D);
  LOOPMOE_CUDA_CALL(T, gather_rows, (dst, src, index, rows, D));
}

template <typename T>
void scatter_rows(T* dst, const T* src, const int64_t* index, int64_t rows, int D) {
  if (runs_on_cpu<T>("scatter_rows", {dst, src, index}))
    return cpu::scatter_rows(dst, src, index, rows, D);
  LOOPMOE_CUDA_CALL(T, scatter_rows, (dst, src, index, rows, D));
}

template <typename T>
void moe_combine_forward(T* y, const T* expert_out, const T* weight, const uint8_t* kept, int S,
                         int k, int D) {
  if (runs_on_cpu<T>("moe_combine_forward", {y, expert_out, weight, kept}))
    return cpu::moe_combine_forward(y, expert_out, weight, kept, S, k, D);
  LOOPMOE_CUDA_CALL(T, moe_combine_forward, (y, expert_out, weight, kept, S, k, D));
}

template <typename T>
void moe_combine_backward(T* dexpert_out, T* dweight, const T* dy, const T* expert_out,
                          const T* weight, const uint8_t* kept, int S, int k, int D) {
  if (runs_on_cpu<T>("moe_combine_backward", {dexpert_out, dweight, dy, expert_out, weight, kept}))
    return cpu::moe_combine_backward(dexpert_out, dweight, dy, expert_out, weight, kept, S, k, D);
  LOOPMOE_CUDA_CALL(T, moe_combine_backward,
                    (dexpert_out, dweight, dy, expert_out, weight, kept, S, k, D));
}

template <typename T>
void router_topk_forward(int32_t* expert, T* weight, const T* probs, int S, int E, int k,
                         bool renormalize) {
  if (runs_on_cpu<T>("router_topk_forward", {expert, weight, probs}))
    return cpu::router_topk_forward(expert, weight, probs, S, E, k, renormalize);
  LOOPMOE_CUDA_CALL(T, router_topk_forward, (expert, weight, probs, S, E, k, renormalize));
}

template <typename T>
void router_topk_backward(T* dprobs, const T* dweight, const T* probs, const int32_t* expert,
                          const T* weight, const T* bias, int S, int E, int k, bool renormalize) {
  if (runs_on_cpu<T>("router_topk_backward", {dprobs, dweight, probs, expert, weight, bias}))
    return cpu::router_topk_backward(dprobs, dweight, probs, expert, weight, bias, S, E, k,
                                     renormalize);
  LOOPMOE_CUDA_CALL(T, router_topk_backward,
                    (dprobs, dweight, probs, expert, weight, bias, S, E, k, renormalize));
}

template <typename T>
void router_stats(int64_t* assigned, LossSum* prob_sum, LossSum* lse_sq_sum, const int32_t* expert,
                  const T* probs, const T* lse, int S, int E, int k) {
  if (runs_on_cpu<T>("router_stats", {expert, probs, lse}))
    return cpu::router_stats(assigned, prob_sum, lse_sq_sum, expert, probs, lse, S, E, k);
  LOOPMOE_CUDA_CALL(T, router_stats, (assigned, prob_sum, lse_sq_sum, expert, probs, lse, S, E, k));
}

template <typename T>
void router_zloss_backward(T* dlogits, const T* probs, const T* lse, int S, int E, double z_scale,
                           double tokens) {
  if (runs_on_cpu<T>("router_zloss_backward", {dlogits, probs, lse}))
    return cpu::router_zloss_backward(dlogits, probs, lse, S, E, z_scale, tokens);
  LOOPMOE_CUDA_CALL(T, router_zloss_backward, (dlogits, probs, lse, S, E, z_scale, tokens));
}

template <typename T>
void add_row_vector(T* x, const T* v, int S, int D) {
  if (runs_on_cpu<T>("add_row_vector", {x, v})) return cpu::add_row_vector(x, v, S, D);
  LOOPMOE_CUDA_CALL(T, add_row_vector, (x, v, S, D));
}

template <typename T>
void sum_rows(T* out, const T* x, int rows, int D) {
  if (runs_on_cpu<T>("sum_rows", {out, x})) return cpu::sum_rows(out, x, rows, D);
  LOOPMOE_CUDA_CALL(T, sum_rows, (out, x, rows, D));
}

template <typename T>
void add_inplace(T* dst, const T* src, size_t n) {
  if (runs_on_cpu<T>("add_inplace", {dst, src})) return cpu::add_inplace(dst, src, n);
  LOOPMOE_CUDA_CALL(T, add_inplace, (dst, src, n));
}

template <typename T>
void copy_masked_rows(T* x, const T* src, const int32_t* mask, int S, int D) {
  if (runs_on_cpu<T>("copy_masked_rows", {x, src, mask}))
    return cpu::copy_masked_rows(x, src, mask, S, D);
  LOOPMOE_CUDA_CALL(T, copy_masked_rows, (x, src, mask, S, D));
}

template <typename T>
void halt_converged_rows(int32_t* halted_at, T* frozen, const T* prev, const T* cur, int S, int D,
                         double threshold, int iteration) {
  if (runs_on_cpu<T>("halt_converged_rows", {halted_at, frozen, prev, cur}))
    return cpu::halt_converged_rows(halted_at, frozen, prev, cur, S, D, threshold, iteration);
  LOOPMOE_CUDA_CALL(T, halt_converged_rows,
                    (halted_at, frozen, prev, cur, S, D, threshold, iteration));
}

double sum_squares(const float* g, size_t n) {
  if (runs_on_cpu<float>("sum_squares", {g})) return cpu::sum_squares(g, n);
  LOOPMOE_CUDA_CALL(float, sum_squares, (g, n));
}

void scale_inplace(float* g, size_t n, float c) {
  if (runs_on_cpu<float>("scale_inplace", {g})) return cpu::scale_inplace(g, n, c);
  LOOPMOE_CUDA_CALL(float, scale_inplace, (g, n, c));
}

void adamw_update(float* p, float* m, float* v, const float* g, const uint8_t* decay, size_t n,
                  const AdamWStep& step) {
  if (runs_on_cpu<float>("adamw_update", {p, m, v, g, decay}))
    return cpu::adamw_update(p, m, v, g, decay, n, step);
  LOOPMOE_CUDA_CALL(float, adamw_update, (p, m, v, g, decay, n, step));
}

#define LOOPMOE_INSTANTIATE(T)                                                                     \
  template void tree_sum_groups<T>(T*, size_t, int,                                                \
                                   const std::vector<std::pair<size_t, size_t>>&);                 \
  template void gemm<T>(bool, bool, int, int, int, T, const T*, int, const T*, int, T, T*, int);   \
  template void embedding_forward<T>(T*, const int32_t*, const T*, int, int);                      \
  template void embedding_backward<T>(T*, const T*, const int32_t*, int, int);                     \
  template void embedding_backward<T>(const GradGroups<T>&, const T*, const int32_t*, int);        \
  template void rmsnorm_forward<T>(T*, T*, const T*, const T*, int, int);                          \
  template void rmsnorm_backward<T>(T*, T*, const T*, const T*, const T*, const T*, int, int);     \
  template void rmsnorm_weight_backward<T>(const GradGroups<T>&, const T*, const T*, const T*,     \
                                           int);                                                   \
  template void matmul_forward<T>(T*, const T*, const T*, const T*, int, int, int);                \
  template void matmul_backward<T>(T*, T*, T*, const T*, const T*, const T*, int, int, int);       \
  template void matmul_backward<T>(T*, const GradGroups<T>&, const GradGroups<T>*, const T*,       \
                                   const T*, const T*, int, int);                                  \
  template void silu_forward<T>(T*, const T*, size_t);                                             \
  template void silu_backward<T>(T*, const T*, const T*, size_t);                                  \
  template void adaln_modulate_forward<T>(T*, const T*, const T*, int, int);                       \
  template void adaln_modulate_backward<T>(T*, T*, const T*, const T*, const T*, int, int);        \
  template void gated_residual_forward<T>(T*, const T*, const T*, int, int);                       \
  template void gated_residual_backward<T>(T*, T*, const T*, const T*, const T*, int, int);        \
  template void iteration_encoding<T>(T*, int, int);                                               \
  template void rope_forward<T>(T*, const T*, const T*, int, int, int, int);                       \
  template void rope_backward<T>(T*, const T*, const T*, int, int, int, int);                      \
  template void rope_tables<T>(T*, T*, int, int, double);                                          \
  template void attention_forward<T>(T*, T*, const T*, int, int, int, int);                        \
  template void attention_backward<T>(T*, T*, const T*, const T*, const T*, int, int, int, int);   \
  template void softmax_forward<T>(T*, T*, const T*, int, int);                                    \
  template void softmax_backward<T>(T*, const T*, const T*, int, int);                             \
  template LossSum crossentropy_forward_sum<T>(T*, const T*, const int32_t*, int, int);            \
  template double crossentropy_forward<T>(T*, const T*, const int32_t*, int, int);                 \
  template void crossentropy_backward<T>(T*, const T*, const int32_t*, T, int, int);               \
  template void swiglu_forward<T>(T*, T*, T*, T*, const T*, const T*, const T*, const T*, int,     \
                                  int, int);                                                       \
  template void swiglu_backward<T>(T*, T*, T*, T*, T*, const T*, const T*, const T*, const T*,     \
                                   const T*, const T*, const T*, const T*, int, int, int);         \
  template void experts_swiglu_forward<T>(T*, T*, T*, T*, const T*, const int64_t*, int, const T*, \
                                          const T*, const T*, int, int);                           \
  template void experts_swiglu_backward<T>(T*, T*, T*, T*, T*, const T*, const T*, const T*,       \
                                           const T*, const T*, const int64_t*, int, const T*,      \
                                           const T*, const T*, int, int);                          \
  template void moe_permute_forward<T>(T*, const T*, const int64_t*, size_t, int, int);            \
  template void moe_permute_backward<T>(T*, const T*, const int64_t*, int, int, int);              \
  template void moe_unpermute_forward<T>(T*, const T*, const int64_t*, size_t, int);               \
  template void moe_unpermute_backward<T>(T*, const T*, const int64_t*, size_t, int);              \
  template void gather_rows<T>(T*, const T*, const int64_t*, int64_t, int);                        \
  template void scatter_rows<T>(T*, const T*, const int64_t*, int64_t, int);                       \
  template void moe_combine_forward<T>(T*, const T*, const T*, const uint8_t*, int, int, int);     \
  template void moe_combine_backward<T>(T*, T*, const T*, const T*, const T*, const uint8_t*, int, \
                                        int, int);                                                 \
  template void router_topk_forward<T>(int32_t*, T*, const T*, int, int, int, bool);               \
  template void router_topk_backward<T>(T*, const T*, const T*, const int32_t*, const T*,          \
                                        const T*, int, int, int, bool);                            \
  template void router_stats<T>(int64_t*, LossSum*, LossSum*, const int32_t*, const T*, const T*,  \
                                int, int, int);                                                    \
  template void router_zloss_backward<T>(T*, const T*, const T*, int, int, double, double);        \
  template void add_row_vector<T>(T*, const T*, int, int);                                         \
  template void sum_rows<T>(T*, const T*, int, int);                                               \
  template void add_inplace<T>(T*, const T*, size_t);                                              \
  template void copy_masked_rows<T>(T*, const T*, const int32_t*, int, int);                       \
  template void halt_converged_rows<T>(int32_t*, T*, const T*, const T*, int, int, double, int);

LOOPMOE_INSTANTIATE(float)
LOOPMOE_INSTANTIATE(double)
#undef LOOPMOE_INSTANTIATE

}  // namespace loopmoe::model::ops
