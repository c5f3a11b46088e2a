// The engine's kernels: forward/backward pairs on flat row-major buffers (docs/MODEL.md has the
// maths). This header is the device seam: every arithmetic loop over activations, gradients or
// parameters is one of these functions, and the model-level files (model.cc, iter_adaln, router,
// moe_layer, experts, dispatchers, optimizer) only allocate buffers (buffer.h) and call them.
// Each function here dispatches on the process's default device (buffer.h; model/ops_dispatch.cc):
// the CPU kernels are model/cpu/ (namespace ops::cpu, ops_cpu.h: OpenMP, batch-invariant sgemm),
// the CUDA kernels model/cuda/ (ops::cuda, ops_cuda.h; float only). Pointers are to memory on
// the default device unless a comment says "host". model/ops_list.h repeats this list once, in a
// form the backends' declarations, the dispatchers and the instantiations are generated from;
// a function added here needs its entry there (ops_dispatch.cc checks that the two agree).
// Templates are instantiated for float (training) and double (gradient checks).
// Backward kernels ACCUMULATE (+=) into parameter gradients and into input gradients unless the
// comment says otherwise, so callers zero gradient buffers once per step.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace loopmoe::model::ops {

// Where the gradient of one parameter tensor accumulates when the batch's rows are split into
// `groups` groups of whole sequences (docs/MODEL.md "Gradient reduction"): group g owns rows
// [row_begin(g), row_end(g)) and accumulates into at(g); the groups are summed afterwards in a
// fixed pairwise tree (tree_sum_groups). Data-parallel workers that each hold a subtree's groups
// then produce bit for bit the gradient one process would. groups == 1: one buffer, no tree.
template <typename T>
struct GradGroups {
  T* base = nullptr;  // group 0's gradient of this tensor
  size_t stride = 0;  // elements from one group's buffer to the next
  int groups = 1;
  int sequences = 1;  // sequences in the batch; rows = sequences * seq_len
  int seq_len = 1;

  // One buffer for all `rows` rows.
  static GradGroups single(T* grads, int rows) { return {grads, 0, 1, 1, rows}; }
  T* at(int g) const { return base + static_cast<size_t>(g) * stride; }
  int row_begin(int g) const {
    return static_cast<int>(static_cast<int64_t>(sequences) * g / groups) * seq_len;
  }
  int row_end(int g) const { return row_begin(g + 1); }
  // The same groups, for the tensor `offset` elements further into each buffer.
  GradGroups shifted(size_t offset) const {
    GradGroups r = *this;
    r.base += offset;
    return r;
  }
};

// buffers[g][i] for g in [0, groups) summed into buffers[0] in the fixed pairwise tree
// sum(lo, hi) = sum(lo, mid) + sum(mid, hi), mid = lo + (hi - lo) / 2, for every i of `ranges`
// ([offset, length) pairs). Elementwise parallel, so the result does not depend on threads.
template <typename T>
void tree_sum_groups(T* base, size_t stride, int groups,
                     const std::vector<std::pair<size_t, size_t>>& ranges);

// C[M,N] = alpha * op(A) @ op(B) + beta * C, row-major, op = transpose when the flag is set.
// The one place the engine multiplies matrices, so FLOP accounting lives here. float runs the
// batch-invariant model/cpu/sgemm (each element one fixed fma chain, whatever the call's shape,
// thread split or CPU); double (gradient checks only) runs OpenBLAS.
template <typename T>
void gemm(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a, int lda, const T* b,
          int ldb, T beta, T* c, int ldc);
// Naive reference for tests.
template <typename T>
void gemm_reference(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a, int lda,
                    const T* b, int ldb, T beta, T* c, int ldc);

// The precision of the float matrix products (train.precision, docs/CONFIG.md). kFp32: fp32
// operands, as above. kBf16: every float gemm() (and so matmul_forward/backward, the attention
// QK^T/PV products, the experts and the LM head, which all go through it) first rounds its two
// operands op(A) and op(B) to bfloat16 (model/bf16.h: nearest, ties to even) and then multiplies
// them with fp32 accumulation into the fp32 C (alpha, beta and C are not rounded). Everything
// else stays fp32: parameters (the master weights), gradients between ops, AdamW state, norms,
// softmax, losses. The CPU emulates it (rounded copies of the operands, then the same sgemm: still
// batch-invariant and deterministic) and is the oracle of the CUDA backend's cuBLAS bf16 product;
// double products (gradient checks) ignore the setting.
//
// A process-wide setting, like the default device (buffer.h), read by every gemm() call: gemm
// runs on OpenMP worker threads inside the kernels' parallel loops (per head, per expert), which
// a thread_local set by the caller would not reach, and a parameter would have to run through
// every kernel of ops_list.h that multiplies. Set it outside parallel regions and kernels, before
// a step (the trainer holds a MatmulPrecisionScope for its run); a process trains one model at a
// time, in one precision.
enum class MatmulPrecision : int { kFp32 = 0, kBf16 };
const char* to_string(MatmulPrecision precision);
// "fp32" or "bf16"; throws std::invalid_argument naming the allowed values otherwise.
MatmulPrecision parse_matmul_precision(const std::string& name);
MatmulPrecision matmul_precision();
void set_matmul_precision(MatmulPrecision precision);
// Sets the precision until the scope ends, then restores the previous one.
class MatmulPrecisionScope {
 public:
  explicit MatmulPrecisionScope(MatmulPrecision precision);
  ~MatmulPrecisionScope();
  MatmulPrecisionScope(const MatmulPrecisionScope&) = delete;
  MatmulPrecisionScope& operator=(const MatmulPrecisionScope&) = delete;

 private:
  MatmulPrecision previous_;
};

// Matrix FLOPs executed by gemm() since the last reset (2·m·n·k per call), in total and by the
// kind of work the caller declared with FlopKindScope (the measured audit reads these).
enum class FlopKind : int {
  kOther = 0,
  kAttentionProj,    // qkv and output projections
  kAttentionScores,  // QK^T and PV (the full T×T block, masked half included)
  kRouter,
  kExperts,
  kIterAdaLN,  // conditioning and modulation matmuls
  kHead,       // LM head
  kCount
};
const char* to_string(FlopKind kind);
uint64_t gemm_flops();
uint64_t gemm_flops(FlopKind kind);
void reset_gemm_flops();
// Sets the kind charged by gemm() until the scope ends. Set outside parallel regions only.
class FlopKindScope {
 public:
  explicit FlopKindScope(FlopKind kind);
  ~FlopKindScope();
  FlopKindScope(const FlopKindScope&) = delete;
  FlopKindScope& operator=(const FlopKindScope&) = delete;

 private:
  FlopKind previous_;
};
// Adds 2·m·n·k-style FLOPs to the counters as gemm() does (the current FlopKind; nothing under a
// RecomputeScope): for a backend's products that do not run through the CPU's gemm (cuBLAS,
// fused kernels), so that the measured counts (audit, budget) are the same on every device.
void charge_gemm_flops(uint64_t flops);
// While it lives, gemm() calls made by THIS thread charge no FLOPs: for recomputation (the
// attention backward recomputes its forward's scores), which the model-FLOP convention of the
// budget, the audit and MFU leaves out. Per thread, so it may be used inside parallel regions.
class RecomputeScope {
 public:
  RecomputeScope();
  ~RecomputeScope();
  RecomputeScope(const RecomputeScope&) = delete;
  RecomputeScope& operator=(const RecomputeScope&) = delete;

 private:
  bool previous_;
};

// FLOPs a backend counts where the sizes are, on its device: products whose sizes never reach the
// host (the CUDA experts read their row offsets on the device). gemm_flops() adds what the
// registered counter holds (a read waits for the device) and reset_gemm_flops() clears it, so the
// counts stay those of every other product. One counter at a time; nullptr unregisters it.
class DeviceFlopCounter {
 public:
  virtual ~DeviceFlopCounter() = default;
  virtual uint64_t read(FlopKind kind) = 0;
  virtual void reset() = 0;
};
void register_device_flop_counter(DeviceFlopCounter* counter);
// Whether charge_gemm_flops would charge on this thread now (not under a RecomputeScope), and the
// kind it would charge: for a backend that charges its device counter in its place.
bool flops_charged_now();
FlopKind current_flop_kind();

// The op profile (loopmoe_bench --profile): while it is on, every call of a function of this
// header made through its dispatcher (model/ops_dispatch.cc) is timed on the host, from the call
// to its return, after a device synchronisation when the function ran on CUDA, so each kernel's
// time is charged to the op that launched it (at the cost of the overlap the stream would have
// had: the profiled step is slower than an unprofiled one, read the shares). Totals per op name
// since the last reset; calls from any thread. Off by default, when it costs one atomic load.
struct OpTime {
  std::string name;
  int64_t calls = 0;
  double seconds = 0;
};
void set_op_profiling(bool on);
bool op_profiling();
std::vector<OpTime> op_profile();  // the ops called since the reset, most seconds first
void reset_op_profile();

// out[S,D] = wte[tokens[s], :]
template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* wte, int S, int D);
template <typename T>
void embedding_backward(T* dwte, const T* dout, const int32_t* tokens, int S, int D);
// The same, each row group into its own buffer.
template <typename T>
void embedding_backward(const GradGroups<T>& dwte, const T* dout, const int32_t* tokens, int D);

// out[S,D] = inp / rms(inp) (* weight when weight != nullptr); rstd[S] saved for backward.
template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int S, int D);
// dinp += ..., dweight += ... (dweight may be nullptr when weight is).
template <typename T>
void rmsnorm_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight,
                      const T* rstd, int S, int D);
// Gain gradient alone, each row group into its own buffer (rows from dweight's groups).
template <typename T>
void rmsnorm_weight_backward(const GradGroups<T>& dweight, const T* dout, const T* inp,
                             const T* rstd, int D);

// out[S,O] = inp[S,I] @ w[I,O] (+ bias[O]).
template <typename T>
void matmul_forward(T* out, const T* inp, const T* w, const T* bias, int S, int I, int O);
// dinp[S,I] += dout @ w^T (skipped when dinp == nullptr); dw += inp^T @ dout; dbias += colsum.
template <typename T>
void matmul_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* inp, const T* w, int S,
                     int I, int O);
// The same with dw (and dbias when given) accumulated per row group (rows from dw's groups).
template <typename T>
void matmul_backward(T* dinp, const GradGroups<T>& dw, const GradGroups<T>* dbias, const T* dout,
                     const T* inp, const T* w, int I, int O);

// out = silu(inp) elementwise over n values; backward: dinp += dout * silu'(inp).
template <typename T>
void silu_forward(T* out, const T* inp, size_t n);
template <typename T>
void silu_backward(T* dinp, const T* dout, const T* inp, size_t n);

// IterAdaLN modulation: u[S,D] = n ⊙ (1 + scale) + shift, with m[S,3D] = [shift | scale | gate].
template <typename T>
void adaln_modulate_forward(T* u, const T* n, const T* m, int S, int D);
// dn += du ⊙ (1 + scale); dm[:, 0:2D] = (du, du ⊙ n) (overwrites those columns of dm).
template <typename T>
void adaln_modulate_backward(T* dn, T* dm, const T* du, const T* n, const T* m, int S, int D);

// Gated residual: x[S,D] += (1 + gate) ⊙ y, gate = m[:, 2D:3D] (m == nullptr: plain x += y).
template <typename T>
void gated_residual_forward(T* x, const T* y, const T* m, int S, int D);
// dy = (1 + gate) ⊙ dx (overwrites); dm[:, 2D:3D] = dx ⊙ y (overwrites). dx passes through.
template <typename T>
void gated_residual_backward(T* dy, T* dm, const T* dx, const T* y, const T* m, int S, int D);

// Sinusoidal iteration encoding pe[dc] of loop index r (docs/MODEL.md).
template <typename T>
void iteration_encoding(T* pe, int r, int dc);

// Rotary embedding applied in place to q and k inside qkv[B*T, 3*inner] (interleaved pairs).
// cos/sin tables are [T, hd/2]. Backward rotates the gradient by the inverse angle in place.
template <typename T>
void rope_forward(T* qkv, const T* cos_t, const T* sin_t, int B, int T_, int H, int hd);
template <typename T>
void rope_backward(T* dqkv, const T* cos_t, const T* sin_t, int B, int T_, int H, int hd);
template <typename T>
void rope_tables(T* cos_t, T* sin_t, int T_, int hd, double theta);

// Causal attention in the flash form: nothing of size T×T is saved between forward and backward.
// qkv[B*T, 3*H*hd] (q,k post-rotary), out[B*T, H*hd], lse[B,H,T] = log Σ_{s≤t} exp(q_t·k_s/√hd)
// of each query row (saved instead of the probabilities). Backward writes (overwrites) dqkv from
// dout, qkv and the forward's out and lse. scratch: the CPU's temporaries, T*T values per thread
// in the forward and 2*T*T per thread in the backward (the CPU recomputes each head's
// probabilities exactly as its forward did, so its gradients are those of the saved-probability
// form bit for bit); a GPU backend may ignore it (nullptr allowed there). The backward's
// recomputed scores charge no FLOPs (model FLOPs count the forward once: RecomputeScope).
template <typename T>
void attention_forward(T* out, T* lse, T* scratch, const T* qkv, int B, int T_, int H, int hd);
template <typename T>
void attention_backward(T* dqkv, T* scratch, const T* dout, const T* qkv, const T* out,
                        const T* lse, int B, int T_, int H, int hd);

// Row-wise softmax of logits[S,E] into probs; lse[S] = logsumexp of each row.
template <typename T>
void softmax_forward(T* probs, T* lse, const T* logits, int S, int E);
// dlogits = probs ⊙ (dprobs − Σ dprobs ⊙ probs) (overwrites).
template <typename T>
void softmax_backward(T* dlogits, const T* dprobs, const T* probs, int S, int E);

// A sum of per-row losses in fixed point: each row's loss rounded to a multiple of kUnit and
// added as an integer. Integer addition is associative, so the sum of a batch does not depend on
// how its rows are split into calls or over data-parallel workers (who add their sums): the
// reported loss is the single process's bit for bit (docs/MODEL.md "Batch-invariant numerics").
// A row whose loss is not finite or not below 2^20, or a sum that would overflow, counts in
// `invalid` and makes value() NaN, so divergence is still reported.
struct LossSum {
  static constexpr double kUnit = 0x1p-30;  // resolution per row: 9.3e-10
  int64_t units = 0;
  int64_t invalid = 0;
  void add_row(double loss);
  void add(const LossSum& other);
  double value() const;  // units · kUnit, or NaN when anything was invalid
};

// Cross-entropy of logits[S,V] against targets: the sum over rows; probs[S,V] receives the softmax.
// probs may be logits itself: the softmax then overwrites the logits (the model's LM head does so).
template <typename T>
LossSum crossentropy_forward_sum(T* probs, const T* logits, const int32_t* targets, int S, int V);
// The mean over rows, summed in floating point (exact enough for the double gradient checks, not
// split-invariant: training reports crossentropy_forward_sum).
template <typename T>
double crossentropy_forward(T* probs, const T* logits, const int32_t* targets, int S, int V);
// dlogits = (probs − onehot) * scale (overwrites; may alias probs).
template <typename T>
void crossentropy_backward(T* dlogits, const T* probs, const int32_t* targets, T scale, int S,
                           int V);

// SwiGLU expert on n rows: h1 = x@w1, h3 = x@w3 [n,F], act = silu(h1) ⊙ h3, out = act @ w2.
template <typename T>
void swiglu_forward(T* out, T* h1, T* h3, T* act, const T* x, const T* w1, const T* w3, const T* w2,
                    int n, int D, int F);
// dx (overwrites), dw1/dw3/dw2 += ...; scratch holds 2*n*F values.
template <typename T>
void swiglu_backward(T* dx, T* dw1, T* dw3, T* dw2, T* scratch, const T* dout, const T* x,
                     const T* h1, const T* h3, const T* act, const T* w1, const T* w3, const T* w2,
                     int n, int D, int F);

// Grouped SwiGLU over E experts whose rows are contiguous: expert e owns rows
// [offset[e], offset[e+1]) (offset: [E+1], in the activations' memory, non-decreasing, offset[E] ≤
// rows) of x, out [rows,D] and h1, h3, act [rows,F], and the weights w1 + e·D·F [D,F],
// w3 + e·D·F [D,F], w2 + e·F·D [F,D]; rows outside the experts are not touched. Each expert runs
// on one thread from start to end, so results do not depend on scheduling.
template <typename T>
void experts_swiglu_forward(T* out, T* h1, T* h3, T* act, const T* x, const int64_t* offset, int E,
                            int64_t rows, const T* w1, const T* w3, const T* w2, int D, int F);
// dx [rows,D] (overwrites the experts' rows); dw1, dw3, dw2 (same layout as the weights) += ...;
// scratch holds 2·rows·F values.
template <typename T>
void experts_swiglu_backward(T* dx, T* dw1, T* dw3, T* dw2, T* scratch, const T* dout, const T* x,
                             const T* h1, const T* h3, const T* act, const int64_t* offset, int E,
                             int64_t rows, const T* w1, const T* w3, const T* w2, int D, int F);

// ---- MoE dispatch: moving rows between token order and expert order ----
// A routing of S tokens to k slots each is laid out as rows grouped by expert; row_of_slot[i]
// (slots = S·k entries, slot i = t·k + j) is the row of slot i in that order, -1 when dropped.
//
// Permute tokens into expert order: rows[row_of_slot[i], :] = x[i / k, :] for kept slots i
// (rows [kept, D]). With k = 1 it moves one row per slot.
template <typename T>
void moe_permute_forward(T* rows, const T* x, const int64_t* row_of_slot, size_t slots, int k,
                         int D);
// Its backward, a row scatter-add: dx[t, :] += Σ_j drows[row_of_slot[t·k + j], :] over kept
// slots j in order (dx [S,D]); each token's sum in a fixed order whatever the threads.
template <typename T>
void moe_permute_backward(T* dx, const T* drows, const int64_t* row_of_slot, int S, int k, int D);
// Back to slot order: out[i, :] = rows[row_of_slot[i], :], zeros for dropped slots (out
// [slots, D], overwritten).
template <typename T>
void moe_unpermute_forward(T* out, const T* rows, const int64_t* row_of_slot, size_t slots, int D);
// Its backward: drows[row_of_slot[i], :] = dout[i, :] for kept slots (overwrites).
template <typename T>
void moe_unpermute_backward(T* drows, const T* dout, const int64_t* row_of_slot, size_t slots,
                            int D);
// The layout itself, the expert-order rows of a routing's kept slots: offset[E+1] (written) is the
// running sum of received[E], the experts' kept counts (offset[0] = 0), and a kept slot i
// (kept[i] != 0, expert[i] = e) being the r-th kept slot of expert e in slot order gets
// row_of_slot[i] = offset[e] + r; −1 for dropped slots. expert, kept, row_of_slot: [slots].
void moe_rows_by_expert(int64_t* row_of_slot, int64_t* offset, const int32_t* expert,
                        const uint8_t* kept, const int64_t* received, size_t slots, int E);
// The capacity walk (docs/MODEL.md "Capacity"): slot i of expert e = expert[i], the r-th slot of
// e in slot order, is kept (kept[i] = 1, else 0) when preceding[e] + r < capacity, preceding[e]
// being e's slots of the batch that come before these (nullptr: none, one process); capacity < 0
// keeps every slot (dropless). received[e] (written): e's kept slots.
void moe_capacity_keep(uint8_t* kept, int64_t* received, const int32_t* expert,
                       const int64_t* preceding, int64_t capacity, size_t slots, int E);
// Row permutations by an index (index: rows entries, each row of src/dst used once):
// gather dst[r, :] = src[index[r], :]; scatter dst[index[r], :] = src[r, :].
template <typename T>
void gather_rows(T* dst, const T* src, const int64_t* index, int64_t rows, int D);
template <typename T>
void scatter_rows(T* dst, const T* src, const int64_t* index, int64_t rows, int D);

// MoE combine: y[t, :] = Σ_{kept j} weight[t·k+j] · expert_out[t·k+j, :] (y [S,D], overwritten;
// expert_out [S·k, D]; weight, kept [S·k]), slots in order.
template <typename T>
void moe_combine_forward(T* y, const T* expert_out, const T* weight, const uint8_t* kept, int S,
                         int k, int D);
// dexpert_out[slot, :] = weight[slot] · dy[t, :] and dweight[slot] = dy[t, :] · expert_out[slot, :]
// for kept slots, zeros for dropped ones (both overwritten).
template <typename T>
void moe_combine_backward(T* dexpert_out, T* dweight, const T* dy, const T* expert_out,
                          const T* weight, const uint8_t* kept, int S, int k, int D);

// ---- Router ----
// Top-k of each row of probs[S,E] by repeated arg-max (strict '>': ties to the lower index), in
// descending order: expert[S·k] the indices, weight[S·k] the selected probabilities, divided by
// their sum when renormalize (the combine weights; docs/MODEL.md "MoE sublayer" 2-3).
template <typename T>
void router_topk_forward(int32_t* expert, T* weight, const T* probs, int S, int E, int k,
                         bool renormalize);
// dprobs[S,E] (overwrites) = the combine weights' gradient dweight[S·k] taken back to the
// probabilities (w = p / Σp when renormalize, else w = p), plus bias[E] on every row (the
// load-balance loss's gradient, the same for every token).
template <typename T>
void router_topk_backward(T* dprobs, const T* dweight, const T* probs, const int32_t* expert,
                          const T* weight, const T* bias, int S, int E, int k, bool renormalize);
// Batch statistics of S routed tokens, written (not added to): assigned[E] the top-k slots
// choosing each expert; prob_sum[E] Σ_t probs[t, e] and lse_sq_sum[1] Σ_t lse_t², row by row in
// fixed point (the same units whatever the order of the rows).
template <typename T>
void router_stats(int64_t* assigned, LossSum* prob_sum, LossSum* lse_sq_sum, const int32_t* expert,
                  const T* probs, const T* lse, int S, int E, int k);
// The load-balance loss's gradient by expert, for router_topk_backward's bias: bias[e] =
// T(aux_scale · E · (assigned[e] / (tokens · k)) / tokens), assigned[E] the batch's top-k
// assignments (d(aux_scale · E · Σ_e f_e P_e)/dp_te with f_e = assigned_e / (tokens · k)).
template <typename T>
void router_balance_bias(T* bias, const int64_t* assigned, int E, int k, double tokens,
                         double aux_scale);
// z-loss gradient: dlogits[t, e] += c_t · probs[t, e] with c_t = T(z_scale · 2 · lse_t / tokens)
// (d/dlogits of z_scale · Σ_t lse_t² / tokens).
template <typename T>
void router_zloss_backward(T* dlogits, const T* probs, const T* lse, int S, int E, double z_scale,
                           double tokens);

// ---- Elementwise and row utilities (compiled without -ffast-math: model/cpu/ops_strict.cc) ----
// x[S,D] += v[D] on every row.
template <typename T>
void add_row_vector(T* x, const T* v, int S, int D);
// out[D] += Σ_r x[r, :] over rows r = 0..rows-1 in order.
template <typename T>
void sum_rows(T* out, const T* x, int rows, int D);
// dst[n] += src[n].
template <typename T>
void add_inplace(T* dst, const T* src, size_t n);
// Rows with mask[t] != 0: x[t, :] = src[t, :].
template <typename T>
void copy_masked_rows(T* x, const T* src, const int32_t* mask, int S, int D);
// Adaptive halting (inference): every row t still running (halted_at[t] == 0) whose change
// ‖cur_t − prev_t‖ < threshold · ‖prev_t‖ (norms in double, ‖prev_t‖² at least 1e-30) halts:
// halted_at[t] = iteration, frozen[t, :] = cur[t, :].
template <typename T>
void halt_converged_rows(int32_t* halted_at, T* frozen, const T* prev, const T* cur, int S, int D,
                         double threshold, int iteration);

// ---- Optimiser on the flat parameter buffer (float; compiled without -ffast-math) ----
// Σ g[i]² in double: partial sums of 4096-element blocks (each in index order), then the blocks'
// partial sums in block order. The order is fixed, so the result does not depend on threads.
double sum_squares(const float* g, size_t n);
// g[n] *= c.
void scale_inplace(float* g, size_t n, float c);
// One AdamW step's constants (docs/MODEL.md "Optimiser"): bias corrections c1 = 1/(1−β1^s),
// c2 = 1/(1−β2^s).
struct AdamWStep {
  float beta1, beta2, c1, c2, lr, eps, weight_decay;
};
// For i < n: m = β1 m + (1−β1) g, v = β2 v + (1−β2) g², p −= lr (m c1 / (sqrt(v c2) + eps)
// + (decay[i] ? weight_decay · p : 0)).
void adamw_update(float* p, float* m, float* v, const float* g, const uint8_t* decay, size_t n,
                  const AdamWStep& step);

}  // namespace loopmoe::model::ops
