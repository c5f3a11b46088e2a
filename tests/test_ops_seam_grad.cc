// Gradient checks (double precision) of the device seam's new kernels (issue 12): MoE combine,
// permute/unpermute, router top-k and z-loss, grouped SwiGLU experts, row broadcasts; and the
// activation Buffer.
#include <gtest/gtest.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/buffer.h"
#include "model/ops.h"
#include "tests/grad_check.h"
#include "tests/ops_test_util.h"

namespace loopmoe {
namespace {

using testing::dot;
using testing::expect_gradient;
using testing::random_vector;
using V = std::vector<double>;
using testing::random_row_of_slot;

TEST(GradCheck, MoeCombine) {
  const int S = 5, k = 2, D = 4;
  const std::vector<uint8_t> kept = {1, 1, 1, 0, 1, 1, 0, 0, 1, 1};
  V out = random_vector(S * k * D, 60), w = random_vector(S * k, 61), g = random_vector(S * D, 62);
  V y(S * D);
  auto loss = [&] {
    model::ops::moe_combine_forward(y.data(), out.data(), w.data(), kept.data(), S, k, D);
    return dot(y, g);
  };
  V dout(out.size(), 5.0), dw(w.size(), 5.0);
  model::ops::moe_combine_backward(dout.data(), dw.data(), g.data(), out.data(), w.data(),
                                   kept.data(), S, k, D);
  expect_gradient(out, dout, loss, "dexpert_out");
  expect_gradient(w, dw, loss, "dweight");
}

TEST(GradCheck, MoePermuteAndUnpermute) {
  const int S = 6, k = 2, D = 3;
  int64_t rows = 0;
  const std::vector<int64_t> ros = random_row_of_slot(S, k, 63, &rows);
  V x = random_vector(S * D, 64), g = random_vector(rows * D, 65), e = random_vector(rows * D, 66);
  V gs = random_vector(S * k * D, 67), r(rows * D), s(S * k * D);
  auto loss = [&] {  // <permute(x), g> + <unpermute(e), gs>
    model::ops::moe_permute_forward(r.data(), x.data(), ros.data(), ros.size(), k, D);
    model::ops::moe_unpermute_forward(s.data(), e.data(), ros.data(), ros.size(), D);
    return dot(r, g) + dot(s, gs);
  };
  V dx(x.size(), 0.0), de(e.size(), 0.0);
  model::ops::moe_permute_backward(dx.data(), g.data(), ros.data(), S, k, D);
  model::ops::moe_unpermute_backward(de.data(), gs.data(), ros.data(), ros.size(), D);
  expect_gradient(x, dx, loss, "dx");
  expect_gradient(e, de, loss, "drows");
}

TEST(GradCheck, RouterTopKWithSelectionFixed) {
  for (bool renorm : {true, false}) {
    const int S = 4, E = 6, k = 3;
    V logits = random_vector(S * E, 70, 3.0), probs(S * E), lse(S), w(S * k);
    std::vector<int32_t> ex(S * k), ex0;
    const V dw = random_vector(S * k, 71), bias = random_vector(E, 72);
    auto loss = [&] {  // <weights, dw> + Σ_t <probs_t, bias>, as a function of the probabilities
      model::ops::router_topk_forward(ex.data(), w.data(), probs.data(), S, E, k, renorm);
      double l = dot(w, dw);
      for (int t = 0; t < S; ++t) {
        for (int e = 0; e < E; ++e) l += probs[t * E + e] * bias[e];
      }
      return l;
    };
    model::ops::softmax_forward(probs.data(), lse.data(), logits.data(), S, E);
    loss();
    ex0 = ex;
    V dprobs(S * E, 5.0);
    model::ops::router_topk_backward(dprobs.data(), dw.data(), probs.data(), ex.data(), w.data(),
                                     bias.data(), S, E, k, renorm);
    expect_gradient(probs, dprobs, loss, renorm ? "dprobs (renormalised)" : "dprobs");
    EXPECT_EQ(ex, ex0) << "the perturbations changed the selection";
  }
}

TEST(GradCheck, RouterZLoss) {
  const int S = 3, E = 5;
  const double z_scale = 0.7, tokens = 4;
  V logits = random_vector(S * E, 73, 2.0), probs(S * E), lse(S);
  auto loss = [&] {
    model::ops::softmax_forward(probs.data(), lse.data(), logits.data(), S, E);
    return z_scale * dot(lse, lse) / tokens;
  };
  loss();
  V dl(S * E, 0.0);
  model::ops::router_zloss_backward(dl.data(), probs.data(), lse.data(), S, E, z_scale, tokens);
  expect_gradient(logits, dl, loss, "dlogits");
}

TEST(GradCheck, GroupedSwiGLUExperts) {
  const int E = 3, D = 4, F = 5;
  const std::vector<int64_t> offset = {0, 2, 2, 5};
  const int rows = 5;
  V x = random_vector(rows * D, 74), g = random_vector(rows * D, 75);
  V w1 = random_vector(E * D * F, 76), w3 = random_vector(E * D * F, 77);
  V w2 = random_vector(E * F * D, 78), out(rows * D), h1(rows * F), h3(h1), act(h1);
  auto loss = [&] {
    model::ops::experts_swiglu_forward(out.data(), h1.data(), h3.data(), act.data(), x.data(),
                                       offset.data(), E, rows, w1.data(), w3.data(), w2.data(), D,
                                       F);
    return dot(out, g);
  };
  loss();
  V dx(x.size()), dw1(w1.size(), 0.0), dw3(dw1), dw2(dw1), scratch(2 * rows * F);
  model::ops::experts_swiglu_backward(
      dx.data(), dw1.data(), dw3.data(), dw2.data(), scratch.data(), g.data(), x.data(), h1.data(),
      h3.data(), act.data(), offset.data(), E, rows, w1.data(), w3.data(), w2.data(), D, F);
  expect_gradient(x, dx, loss, "dx");
  expect_gradient(w1, dw1, loss, "dw1");
  expect_gradient(w3, dw3, loss, "dw3");
  expect_gradient(w2, dw2, loss, "dw2");
}

TEST(GradCheck, RowVectorBroadcastAndRowSum) {
  const int S = 4, D = 3;
  V x0 = random_vector(S * D, 79), v = random_vector(D, 80), g = random_vector(S * D, 81), x;
  auto loss = [&] {
    x = x0;
    model::ops::add_row_vector(x.data(), v.data(), S, D);
    return dot(x, g);
  };
  V dv(D, 0.0);
  model::ops::sum_rows(dv.data(), g.data(), S, D);  // the broadcast's backward
  expect_gradient(v, dv, loss, "dv");
  V a = random_vector(7, 82), b = random_vector(7, 83), c = a;
  model::ops::add_inplace(c.data(), b.data(), c.size());
  for (size_t i = 0; i < c.size(); ++i) EXPECT_EQ(c[i], a[i] + b[i]);
}

TEST(Buffer, HostStorageBehavesLikeAVector) {
  model::Buffer<float> b(5);
  EXPECT_EQ(b.device(), model::Device::kCpu);
  EXPECT_EQ(b.size(), 5u);
  for (size_t i = 0; i < b.size(); ++i) EXPECT_EQ(b[i], 0.f);
  b[2] = 3.f;
  b.resize(8);  // contents kept, new elements zero
  EXPECT_EQ(b[2], 3.f);
  EXPECT_EQ(b[7], 0.f);
  model::Buffer<float> c = b;  // deep copy
  c[2] = 4.f;
  EXPECT_EQ(b[2], 3.f);
  const std::vector<float> host = model::copy_to_host(c);
  EXPECT_EQ(host.size(), 8u);
  EXPECT_EQ(host[2], 4.f);
  float two[2];
  model::copy_to_host(two, c, 2, 2);
  EXPECT_EQ(two[0], 4.f);
  EXPECT_THROW(model::copy_to_host(two, c, 7, 2), std::out_of_range);
  const int32_t src[3] = {1, 2, 3};
  model::Buffer<int32_t> t;
  model::copy_from_host(t, src, 3);
  EXPECT_EQ(t.host_vector(), (std::vector<int32_t>{1, 2, 3}));
  t.set_zero();
  EXPECT_EQ(t[1], 0);
  model::Buffer<float> moved(std::move(c));
  EXPECT_EQ(moved.size(), 8u);
  EXPECT_EQ(moved[2], 4.f);
  model::Buffer<double> filled(4, 1.5);
  EXPECT_EQ(filled[3], 1.5);
  t.clear();
  EXPECT_TRUE(t.empty());
}

// Device::kCuda storage in each of the three situations an executable meets: no CUDA backend (a
// build with LOOPMOE_CUDA off, or an executable that does not link it: this one), the CUDA
// backend on a machine without a GPU (CI here), and the CUDA backend with a GPU, where device
// buffers must work.
TEST(Buffer, DeviceStorageNeedsACudaBuildAndAGpu) {
  EXPECT_STREQ(to_string(model::Device::kCuda), "cuda");
  if (model::detail::device_available()) {
    ASSERT_TRUE(model::detail::device_backend_linked());
    const std::vector<float> values = {1.f, -2.f, 3.5f, 4.f};
    model::Buffer<float> d(values.size(), model::Device::kCuda);
    model::copy_from_host(d, values.data(), values.size());
    EXPECT_EQ(model::copy_to_host(d), values);
    EXPECT_THROW(d.host_vector(), std::logic_error);
    model::set_default_device(model::Device::kCuda);
    EXPECT_EQ(model::default_device(), model::Device::kCuda);
    model::set_default_device(model::Device::kCpu);
    return;
  }
  try {
    model::Buffer<float> d(4, model::Device::kCuda);
    FAIL() << "constructed a device buffer without a CUDA device";
  } catch (const std::runtime_error& e) {
    // Without the backend, model/cuda_backend.cc says so; with it, cudaMalloc's error is named.
    const std::string what = e.what();
    const std::string expected =
        model::detail::device_backend_linked() ? "cudaMalloc" : "no CUDA backend";
    EXPECT_NE(what.find(expected), std::string::npos) << what;
  }
  EXPECT_THROW(model::set_default_device(model::Device::kCuda), std::runtime_error);
  EXPECT_EQ(model::default_device(), model::Device::kCpu);
}

}  // namespace
}  // namespace loopmoe
