// The norm block (RMSNorm or IterAdaLN) as calls of ops.h kernels on Buffer activations.
#include "model/iter_adaln.h"

#include "model/ops.h"

namespace loopmoe::model {

template <typename T>
void NormBlockT<T>::forward(NormActivationsT<T>& a, const T* p, const T* x, int r, int S) const {
  const int D = config_.d_model, dc = config_.cond_dim;
  const size_t SD = static_cast<size_t>(S) * D;
  a.rstd.resize(S);
  a.u.resize(SD);
  if (!config_.adaln()) {
    ops::rmsnorm_forward(a.u.data(), a.rstd.data(), x, p + o_.weight, S, D);
    return;
  }
  a.n.resize(SD);
  ops::rmsnorm_forward(a.n.data(), a.rstd.data(), x, static_cast<const T*>(nullptr), S, D);
  ops::FlopKindScope kind(ops::FlopKind::kIterAdaLN);
  a.c.assign(static_cast<size_t>(S) * dc, T(0));
  if (config_.adaln_token_term()) {
    ops::matmul_forward(a.c.data(), a.n.data(), p + o_.tok_w, static_cast<const T*>(nullptr), S, D,
                        dc);
  }
  if (config_.adaln_iter_term()) {
    // MLP_iter(PE(r)) is one d_c-vector shared by all tokens of this iteration.
    a.pe.resize(dc);
    a.a1.resize(dc);
    a.e.resize(dc);
    Buffer<T> s1(dc);
    ops::iteration_encoding(a.pe.data(), r, dc);
    ops::matmul_forward(a.a1.data(), a.pe.data(), p + o_.iter_w1, p + o_.iter_b1, 1, dc, dc);
    ops::silu_forward(s1.data(), a.a1.data(), dc);
    ops::matmul_forward(a.e.data(), s1.data(), p + o_.iter_w2, p + o_.iter_b2, 1, dc, dc);
    ops::add_row_vector(a.c.data(), a.e.data(), S, dc);
  }
  a.sc.resize(a.c.size());
  ops::silu_forward(a.sc.data(), a.c.data(), a.c.size());
  a.m.resize(3 * SD);
  ops::matmul_forward(a.m.data(), a.sc.data(), p + o_.mod_w, p + o_.mod_b, S, dc, 3 * D);
  ops::adaln_modulate_forward(a.u.data(), a.n.data(), a.m.data(), S, D);
}

template <typename T>
const T* NormBlockT<T>::gate_source(const NormActivationsT<T>& a) const {
  return config_.adaln() ? a.m.data() : nullptr;
}

template <typename T>
void NormBlockT<T>::backward(T* dx, T* g, const T* du, T* dm, const NormActivationsT<T>& a,
                             const T* p, const T* x, int S) const {
  backward(dx, ops::GradGroups<T>::single(g, S), du, dm, a, p, x);
}

template <typename T>
void NormBlockT<T>::backward(T* dx, const ops::GradGroups<T>& g, const T* du, T* dm,
                             const NormActivationsT<T>& a, const T* p, const T* x) const {
  const int D = config_.d_model, dc = config_.cond_dim, S = g.row_end(g.groups - 1);
  if (!config_.adaln()) {
    ops::rmsnorm_backward(dx, static_cast<T*>(nullptr), du, x, p + o_.weight, a.rstd.data(), S, D);
    ops::rmsnorm_weight_backward(g.shifted(o_.weight), du, x, a.rstd.data(), D);
    return;
  }
  ops::FlopKindScope kind(ops::FlopKind::kIterAdaLN);
  Buffer<T> dn(static_cast<size_t>(S) * D);
  ops::adaln_modulate_backward(dn.data(), dm, du, a.n.data(), a.m.data(), S, D);
  Buffer<T> dsc(static_cast<size_t>(S) * dc), dcv(static_cast<size_t>(S) * dc);
  const ops::GradGroups<T> dmod_b = g.shifted(o_.mod_b);
  ops::matmul_backward(dsc.data(), g.shifted(o_.mod_w), &dmod_b, dm, a.sc.data(), p + o_.mod_w, dc,
                       3 * D);
  ops::silu_backward(dcv.data(), dsc.data(), a.c.data(), dcv.size());
  if (config_.adaln_token_term()) {
    ops::matmul_backward(dn.data(), g.shifted(o_.tok_w),
                         static_cast<const ops::GradGroups<T>*>(nullptr), dcv.data(), a.n.data(),
                         p + o_.tok_w, D, dc);
  }
  if (config_.adaln_iter_term()) {
    // MLP_iter's input is one vector for all tokens; its gradient is the sum over each group's
    // tokens, back-propagated per group.
    Buffer<T> s1(dc);
    ops::silu_forward(s1.data(), a.a1.data(), dc);
    for (int grp = 0; grp < g.groups; ++grp) {
      Buffer<T> de(dc), ds1(dc), da1(dc);
      const int r0 = g.row_begin(grp);
      ops::sum_rows(de.data(), dcv.data() + static_cast<size_t>(r0) * dc, g.row_end(grp) - r0, dc);
      T* gg = g.at(grp);
      ops::matmul_backward(ds1.data(), gg + o_.iter_w2, gg + o_.iter_b2, de.data(), s1.data(),
                           p + o_.iter_w2, 1, dc, dc);
      ops::silu_backward(da1.data(), ds1.data(), a.a1.data(), dc);
      ops::matmul_backward(static_cast<T*>(nullptr), gg + o_.iter_w1, gg + o_.iter_b1, da1.data(),
                           a.pe.data(), p + o_.iter_w1, 1, dc, dc);
    }
  }
  ops::rmsnorm_backward(dx, static_cast<T*>(nullptr), dn.data(), x, static_cast<const T*>(nullptr),
                        a.rstd.data(), S, D);
}

template class NormBlockT<float>;
template class NormBlockT<double>;

}  // namespace loopmoe::model
