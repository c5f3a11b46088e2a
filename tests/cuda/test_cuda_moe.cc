// The CUDA MoE kernels (model/cuda/ops_moe.cu): experts, dispatch, combine and router, against
// the CPU. Skipped without a CUDA device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "model/buffer.h"
#include "model/cuda/ops_cuda.h"
#include "model/ops.h"
#include "tests/cuda/cuda_test_util.h"

namespace loopmoe::model {
namespace {

using cuda_testing::check_against_cpu;
using cuda_testing::device_zeros;
using cuda_testing::download;
using cuda_testing::expect_same_bits;
using cuda_testing::kElementwiseTolerance;
using cuda_testing::kReductionTolerance;
using cuda_testing::Outputs;
using cuda_testing::random_floats;
using cuda_testing::upload;

// A routing of S tokens to k slots, about a quarter dropped (-1), the kept ones in a random
// expert order: row_of_slot, and *rows kept rows.
std::vector<int64_t> random_row_of_slot(int S, int k, uint64_t seed, int64_t* rows) {
  std::mt19937_64 gen(seed);
  std::vector<int64_t> row_of_slot(static_cast<size_t>(S) * k, -1);
  std::vector<size_t> kept;
  for (size_t i = 0; i < row_of_slot.size(); ++i) {
    if (gen() % 4 != 0) kept.push_back(i);
  }
  std::vector<int64_t> order(kept.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::shuffle(order.begin(), order.end(), gen);
  for (size_t i = 0; i < kept.size(); ++i) row_of_slot[kept[i]] = order[i];
  *rows = static_cast<int64_t>(kept.size());
  return row_of_slot;
}

TEST(CudaMoe, ExpertsSwiglu) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const int E = 4, D = 48, F = 80;
  const std::vector<int64_t> offset = {0, 37, 37, 100, 129};  // expert 1 has no rows
  const size_t rows = static_cast<size_t>(offset[E]), wsize = static_cast<size_t>(E) * D * F;
  const std::vector<float> x = random_floats(rows * D, 50), dout = random_floats(rows * D, 51);
  const std::vector<float> w1 = random_floats(wsize, 52, 0.2), w3 = random_floats(wsize, 53, 0.2);
  const std::vector<float> w2 = random_floats(wsize, 54, 0.2);
  const std::vector<float> dw0 = random_floats(wsize, 55);
  std::vector<float> out(rows * D), h1(rows * F), h3(rows * F), act(rows * F), dx(rows * D);
  std::vector<float> dw1 = dw0, dw3 = dw0, dw2 = dw0, scratch(2 * rows * F);
  ops::experts_swiglu_forward(out.data(), h1.data(), h3.data(), act.data(), x.data(), offset.data(),
                              E, w1.data(), w3.data(), w2.data(), D, F);
  ops::experts_swiglu_backward(dx.data(), dw1.data(), dw3.data(), dw2.data(), scratch.data(),
                               dout.data(), x.data(), h1.data(), h3.data(), act.data(),
                               offset.data(), E, w1.data(), w3.data(), w2.data(), D, F);
  check_against_cpu(
      {out, h1, h3, act, dx, dw1, dw3, dw2},
      [&] {
        Buffer<float> dxin = upload(x), ddout = upload(dout), dw1in = upload(w1),
                      dw3in = upload(w3), dw2in = upload(w2);
        Buffer<float> dout_e = device_zeros<float>(out.size()),
                      dh1 = device_zeros<float>(h1.size()), dh3 = device_zeros<float>(h3.size()),
                      dact = device_zeros<float>(act.size());
        Buffer<float> ddx = device_zeros<float>(dx.size()), ddw1 = upload(dw0), ddw3 = upload(dw0),
                      ddw2 = upload(dw0), dscratch = device_zeros<float>(scratch.size());
        ops::cuda::experts_swiglu_forward(dout_e.data(), dh1.data(), dh3.data(), dact.data(),
                                          dxin.data(), offset.data(), E, dw1in.data(), dw3in.data(),
                                          dw2in.data(), D, F);
        ops::cuda::experts_swiglu_backward(ddx.data(), ddw1.data(), ddw3.data(), ddw2.data(),
                                           dscratch.data(), ddout.data(), dxin.data(), dh1.data(),
                                           dh3.data(), dact.data(), offset.data(), E, dw1in.data(),
                                           dw3in.data(), dw2in.data(), D, F);
        return Outputs{download(dout_e), download(dh1),  download(dh3),  download(dact),
                       download(ddx),    download(ddw1), download(ddw3), download(ddw2)};
      },
      kReductionTolerance);
}

TEST(CudaMoe, PermuteUnpermuteGatherScatter) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const int S = 41, k = 3, D = 33;
  const size_t slots = static_cast<size_t>(S) * k;
  int64_t rows = 0;
  const std::vector<int64_t> row_of_slot = random_row_of_slot(S, k, 56, &rows);
  const std::vector<float> x = random_floats(static_cast<size_t>(S) * D, 57);
  const std::vector<float> drows = random_floats(static_cast<size_t>(rows) * D, 58);
  const std::vector<float> dslots = random_floats(slots * D, 59);
  const std::vector<float> dx0 = random_floats(x.size(), 60);
  std::vector<int64_t> index(S);
  for (int i = 0; i < S; ++i) index[i] = i;
  std::shuffle(index.begin(), index.end(), std::mt19937_64(61));
  std::vector<float> permuted(static_cast<size_t>(rows) * D),
      dx = dx0, unpermuted(slots * D), drows_out(static_cast<size_t>(rows) * D), gathered(x.size()),
      scattered(x.size());
  ops::moe_permute_forward(permuted.data(), x.data(), row_of_slot.data(), slots, k, D);
  ops::moe_permute_backward(dx.data(), drows.data(), row_of_slot.data(), S, k, D);
  ops::moe_unpermute_forward(unpermuted.data(), drows.data(), row_of_slot.data(), slots, D);
  ops::moe_unpermute_backward(drows_out.data(), dslots.data(), row_of_slot.data(), slots, D);
  ops::gather_rows(gathered.data(), x.data(), index.data(), S, D);
  ops::scatter_rows(scattered.data(), x.data(), index.data(), S, D);
  check_against_cpu(
      {permuted, dx, unpermuted, drows_out, gathered, scattered},
      [&] {
        Buffer<int64_t> dros = upload(row_of_slot), dindex = upload(index);
        Buffer<float> dxin = upload(x), ddrows = upload(drows), ddslots = upload(dslots);
        Buffer<float> dperm = device_zeros<float>(permuted.size()), ddx = upload(dx0);
        Buffer<float> dunperm = upload(random_floats(unpermuted.size(), 62));  // overwritten
        Buffer<float> ddrows_out = device_zeros<float>(drows_out.size());
        Buffer<float> dgathered = device_zeros<float>(x.size()),
                      dscattered = device_zeros<float>(x.size());
        ops::cuda::moe_permute_forward(dperm.data(), dxin.data(), dros.data(), slots, k, D);
        ops::cuda::moe_permute_backward(ddx.data(), ddrows.data(), dros.data(), S, k, D);
        ops::cuda::moe_unpermute_forward(dunperm.data(), ddrows.data(), dros.data(), slots, D);
        ops::cuda::moe_unpermute_backward(ddrows_out.data(), ddslots.data(), dros.data(), slots, D);
        ops::cuda::gather_rows(dgathered.data(), dxin.data(), dindex.data(), S, D);
        ops::cuda::scatter_rows(dscattered.data(), dxin.data(), dindex.data(), S, D);
        return Outputs{download(dperm),      download(ddx),       download(dunperm),
                       download(ddrows_out), download(dgathered), download(dscattered)};
      },
      kElementwiseTolerance);
}

TEST(CudaMoe, Combine) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const int S = 39, k = 2, D = 300;
  const size_t slots = static_cast<size_t>(S) * k;
  int64_t rows = 0;
  const std::vector<int64_t> row_of_slot = random_row_of_slot(S, k, 63, &rows);
  std::vector<uint8_t> kept(slots);
  for (size_t i = 0; i < slots; ++i) kept[i] = row_of_slot[i] >= 0;
  const std::vector<float> expert_out = random_floats(slots * D, 64);
  const std::vector<float> weight = random_floats(slots, 65);
  const std::vector<float> dy = random_floats(static_cast<size_t>(S) * D, 66);
  std::vector<float> y(static_cast<size_t>(S) * D), dexpert(slots * D), dweight(slots);
  ops::moe_combine_forward(y.data(), expert_out.data(), weight.data(), kept.data(), S, k, D);
  ops::moe_combine_backward(dexpert.data(), dweight.data(), dy.data(), expert_out.data(),
                            weight.data(), kept.data(), S, k, D);
  check_against_cpu(
      {y, dexpert, dweight},
      [&] {
        Buffer<uint8_t> dkept = upload(kept);
        Buffer<float> deo = upload(expert_out), dw = upload(weight), ddy = upload(dy);
        Buffer<float> dyout = upload(random_floats(y.size(), 67));  // all overwritten
        Buffer<float> ddexpert = upload(random_floats(dexpert.size(), 68));
        Buffer<float> ddweight = upload(random_floats(slots, 69));
        ops::cuda::moe_combine_forward(dyout.data(), deo.data(), dw.data(), dkept.data(), S, k, D);
        ops::cuda::moe_combine_backward(ddexpert.data(), ddweight.data(), ddy.data(), deo.data(),
                                        dw.data(), dkept.data(), S, k, D);
        return Outputs{download(dyout), download(ddexpert), download(ddweight)};
      },
      kReductionTolerance);
}

TEST(CudaMoe, Router) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const int S = 77, E = 16, k = 3;
  const std::vector<float> logits = random_floats(static_cast<size_t>(S) * E, 70, 3.0);
  std::vector<float> probs(logits.size()), lse(S);
  ops::softmax_forward(probs.data(), lse.data(), logits.data(), S, E);
  const std::vector<float> dweight = random_floats(static_cast<size_t>(S) * k, 71);
  const std::vector<float> bias = random_floats(E, 72);
  const std::vector<float> dlogits0 = random_floats(logits.size(), 73);
  for (const bool renormalize : {true, false}) {
    SCOPED_TRACE(renormalize ? "renormalize" : "raw weights");
    std::vector<int32_t> expert(static_cast<size_t>(S) * k);
    std::vector<float> weight(expert.size()), dprobs(probs.size()), dlogits = dlogits0;
    ops::router_topk_forward(expert.data(), weight.data(), probs.data(), S, E, k, renormalize);
    ops::router_topk_backward(dprobs.data(), dweight.data(), probs.data(), expert.data(),
                              weight.data(), bias.data(), S, E, k, renormalize);
    ops::router_zloss_backward(dlogits.data(), probs.data(), lse.data(), S, E, 1e-3, 2.0 * S);
    std::vector<int64_t> assigned(E, 0);
    std::vector<ops::LossSum> prob_sum(E);
    ops::LossSum lse_sq;
    ops::router_stats(assigned.data(), prob_sum.data(), &lse_sq, expert.data(), probs.data(),
                      lse.data(), S, E, k);
    std::vector<std::vector<int32_t>> cuda_expert;
    check_against_cpu(
        {weight, dprobs, dlogits},
        [&] {
          Buffer<float> dp = upload(probs), dl = upload(lse), ddw = upload(dweight),
                        dbias = upload(bias), ddl = upload(dlogits0);
          Buffer<int32_t> dex = device_zeros<int32_t>(expert.size());
          Buffer<float> dwt = device_zeros<float>(weight.size());
          Buffer<float> ddp = upload(random_floats(probs.size(), 74));  // overwritten
          ops::cuda::router_topk_forward(dex.data(), dwt.data(), dp.data(), S, E, k, renormalize);
          ops::cuda::router_topk_backward(ddp.data(), ddw.data(), dp.data(), dex.data(), dwt.data(),
                                          dbias.data(), S, E, k, renormalize);
          ops::cuda::router_zloss_backward(ddl.data(), dp.data(), dl.data(), S, E, 1e-3, 2.0 * S);
          cuda_expert.push_back(download(dex));
          return Outputs{download(dwt), download(ddp), download(ddl)};
        },
        kElementwiseTolerance);
    ASSERT_EQ(cuda_expert.size(), 2u);
    EXPECT_EQ(cuda_expert[0], expert);  // the same choices, ties and order included
    expect_same_bits(cuda_expert[0], cuda_expert[1], "expert");
    // Statistics: the same host arithmetic on the same inputs, so exactly equal.
    std::vector<int64_t> cuda_assigned(E, 0);
    std::vector<ops::LossSum> cuda_prob_sum(E);
    ops::LossSum cuda_lse_sq;
    Buffer<int32_t> dex = upload(expert);
    Buffer<float> dp = upload(probs), dl = upload(lse);
    ops::cuda::router_stats(cuda_assigned.data(), cuda_prob_sum.data(), &cuda_lse_sq, dex.data(),
                            dp.data(), dl.data(), S, E, k);
    EXPECT_EQ(cuda_assigned, assigned);
    for (int e = 0; e < E; ++e) EXPECT_EQ(cuda_prob_sum[e].units, prob_sum[e].units) << e;
    EXPECT_EQ(cuda_lse_sq.units, lse_sq.units);
  }
}

}  // namespace
}  // namespace loopmoe::model
