// The CUDA dense-path kernels (model/cuda/ops_dense.cu, ops_gemm.cu) and Buffer's device storage
// (model/cuda/device_cuda.cu) against the CPU. Skipped without a CUDA device.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
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
using cuda_testing::kElementwiseTolerance;
using cuda_testing::kReductionTolerance;
using cuda_testing::Outputs;
using cuda_testing::random_floats;
using cuda_testing::random_ints;
using cuda_testing::upload;

TEST(CudaBuffer, DeviceStorageRoundTrip) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const std::vector<float> host = random_floats(1000, 1);
  Buffer<float> a = upload(host);
  EXPECT_EQ(a.device(), Device::kCuda);
  EXPECT_EQ(download(a), host);
  Buffer<float> b(a);  // device to device
  EXPECT_EQ(download(b), host);
  b.resize(1500);  // grows with zeros, keeps the first 1000
  std::vector<float> grown = host;
  grown.resize(1500, 0.f);
  EXPECT_EQ(download(b), grown);
  b.set_zero();
  EXPECT_EQ(download(b), std::vector<float>(1500, 0.f));
  std::vector<float> part(10);
  copy_to_host(part.data(), a, 990, 10);
  EXPECT_EQ(part, std::vector<float>(host.end() - 10, host.end()));
}

// The one test that runs without a device: the error paths report the failing call instead of
// crashing (device_cuda.cu's checks, LOOPMOE_CUDA_CHECK after a launch, LOOPMOE_CUBLAS_CHECK).
TEST(CudaErrors, WithoutADeviceCallsThrowNamingTheCall) {
  if (detail::device_available()) GTEST_SKIP() << "a CUDA device is present";
  auto message_of = [](auto&& call) -> std::string {
    try {
      call();
    } catch (const std::runtime_error& e) {
      return e.what();
    }
    return "(no exception)";
  };
  const std::string alloc = message_of([] { Buffer<float> b(100, Device::kCuda); });
  EXPECT_NE(alloc.find("cudaMalloc"), std::string::npos) << alloc;
  EXPECT_THROW(set_default_device(Device::kCuda), std::runtime_error);
  const std::string launch = message_of([] {
    ops::cuda::add_inplace(static_cast<float*>(nullptr), static_cast<const float*>(nullptr), 10);
  });
  EXPECT_NE(launch.find("cudaGetLastError"), std::string::npos) << launch;
  const std::string product = message_of([] {
    ops::cuda::gemm<float>(false, false, 2, 2, 2, 1.f, nullptr, 2, nullptr, 2, 0.f, nullptr, 2);
  });
  EXPECT_NE(product.find("cublas"), std::string::npos) << product;
}

TEST(CudaGemm, AllTranspositionsAndLeadingDimensions) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const int m = 37, n = 53, k = 129, pad = 3;
  for (const bool ta : {false, true}) {
    for (const bool tb : {false, true}) {
      for (const float beta : {0.f, 0.5f}) {
        SCOPED_TRACE(testing::Message() << "ta " << ta << " tb " << tb << " beta " << beta);
        const int lda = (ta ? m : k) + pad, ldb = (tb ? k : n) + pad, ldc = n + pad;
        const std::vector<float> a = random_floats(static_cast<size_t>(ta ? k : m) * lda, 2);
        const std::vector<float> b = random_floats(static_cast<size_t>(tb ? n : k) * ldb, 3);
        std::vector<float> c = random_floats(static_cast<size_t>(m) * ldc, 4);
        // beta == 0 must not read C: NaNs there may not leak into the result.
        std::vector<float> c_in = c;
        if (beta == 0.f) c_in.assign(c.size(), std::numeric_limits<float>::quiet_NaN());
        std::vector<float> expected = c_in;
        ops::gemm<float>(ta, tb, m, n, k, 0.75f, a.data(), lda, b.data(), ldb, beta,
                         expected.data(), ldc);
        // The padding columns are not part of C: compare rows' first n values only.
        auto valid = [&](const std::vector<float>& full) {
          std::vector<float> out;
          for (int i = 0; i < m; ++i) {
            out.insert(out.end(), full.begin() + static_cast<size_t>(i) * ldc,
                       full.begin() + static_cast<size_t>(i) * ldc + n);
          }
          return out;
        };
        check_against_cpu(
            {valid(expected)},
            [&] {
              Buffer<float> da = upload(a), db = upload(b), dc = upload(c_in);
              ops::cuda::gemm<float>(ta, tb, m, n, k, 0.75f, da.data(), lda, db.data(), ldb, beta,
                                     dc.data(), ldc);
              return Outputs{valid(download(dc))};
            },
            kReductionTolerance);
      }
    }
  }
}

TEST(CudaDense, Embedding) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const int S = 96, D = 70, V = 11;  // few distinct tokens: many repeats in the backward
  const std::vector<int32_t> tokens = random_ints(S, V, 5);
  const std::vector<float> wte = random_floats(static_cast<size_t>(V) * D, 6);
  const std::vector<float> dout = random_floats(static_cast<size_t>(S) * D, 7);
  const std::vector<float> dwte0 = random_floats(wte.size(), 8);
  const int groups = 3, seq_len = 16;  // 6 sequences in 3 groups
  std::vector<float> out(static_cast<size_t>(S) * D), dwte = dwte0,
                                                      dwte_groups(groups * wte.size(), 0.f);
  ops::embedding_forward(out.data(), tokens.data(), wte.data(), S, D);
  ops::embedding_backward(dwte.data(), dout.data(), tokens.data(), S, D);
  ops::embedding_backward(
      ops::GradGroups<float>{dwte_groups.data(), wte.size(), groups, S / seq_len, seq_len},
      dout.data(), tokens.data(), D);
  check_against_cpu(
      {out, dwte, dwte_groups},
      [&] {
        Buffer<int32_t> dtok = upload(tokens);
        Buffer<float> dw = upload(wte), dg = upload(dout),
                      dout_emb = device_zeros<float>(out.size());
        Buffer<float> ddwte = upload(dwte0), dgroups = device_zeros<float>(dwte_groups.size());
        ops::cuda::embedding_forward(dout_emb.data(), dtok.data(), dw.data(), S, D);
        ops::cuda::embedding_backward(ddwte.data(), dg.data(), dtok.data(), S, D);
        ops::cuda::embedding_backward(
            ops::GradGroups<float>{dgroups.data(), wte.size(), groups, S / seq_len, seq_len},
            dg.data(), dtok.data(), D);
        return Outputs{download(dout_emb), download(ddwte), download(dgroups)};
      },
      0.0);  // a copy, and each element's rows added in the CPU's order: the CPU's bits
}

TEST(CudaDense, Rmsnorm) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const int S = 200, D = 300;  // S > one column chunk (64 rows); D not a multiple of 32
  const std::vector<float> x = random_floats(static_cast<size_t>(S) * D, 9, 2.0);
  const std::vector<float> w = random_floats(D, 10);
  const std::vector<float> dy = random_floats(x.size(), 11);
  const std::vector<float> dx0 = random_floats(x.size(), 12);
  const std::vector<float> dw0 = random_floats(D, 13);
  for (const bool with_weight : {true, false}) {
    SCOPED_TRACE(with_weight ? "weight" : "no weight");
    const float* weight = with_weight ? w.data() : nullptr;
    std::vector<float> y(x.size()), rstd(S), dx = dx0, dw = dw0;
    ops::rmsnorm_forward(y.data(), rstd.data(), x.data(), weight, S, D);
    ops::rmsnorm_backward(dx.data(), with_weight ? dw.data() : nullptr, dy.data(), x.data(), weight,
                          rstd.data(), S, D);
    check_against_cpu(
        {y, rstd, dx, dw},
        [&] {
          Buffer<float> dx_in = upload(x), dweight = upload(w), ddy = upload(dy);
          Buffer<float> dy_out = device_zeros<float>(x.size()), drstd = device_zeros<float>(S);
          Buffer<float> ddx = upload(dx0), ddw = upload(dw0);
          ops::cuda::rmsnorm_forward(dy_out.data(), drstd.data(), dx_in.data(),
                                     with_weight ? dweight.data() : nullptr, S, D);
          ops::cuda::rmsnorm_backward(ddx.data(), with_weight ? ddw.data() : nullptr, ddy.data(),
                                      dx_in.data(), with_weight ? dweight.data() : nullptr,
                                      drstd.data(), S, D);
          return Outputs{download(dy_out), download(drstd), download(ddx), download(ddw)};
        },
        kReductionTolerance);
  }
}

TEST(CudaDense, RmsnormWeightBackwardGroups) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const int seq_len = 50, sequences = 5, groups = 2, D = 96, S = seq_len * sequences;
  const std::vector<float> x = random_floats(static_cast<size_t>(S) * D, 14);
  const std::vector<float> dy = random_floats(x.size(), 15);
  std::vector<float> y(x.size()), rstd(S);
  ops::rmsnorm_forward(y.data(), rstd.data(), x.data(), static_cast<const float*>(nullptr), S, D);
  const std::vector<float> dw0 = random_floats(static_cast<size_t>(groups) * D, 16);
  std::vector<float> dw = dw0;
  ops::rmsnorm_weight_backward(
      ops::GradGroups<float>{dw.data(), static_cast<size_t>(D), groups, sequences, seq_len},
      dy.data(), x.data(), rstd.data(), D);
  check_against_cpu(
      {dw},
      [&] {
        Buffer<float> dx = upload(x), ddy = upload(dy), drstd = upload(rstd), ddw = upload(dw0);
        ops::cuda::rmsnorm_weight_backward(
            ops::GradGroups<float>{ddw.data(), static_cast<size_t>(D), groups, sequences, seq_len},
            ddy.data(), dx.data(), drstd.data(), D);
        return Outputs{download(ddw)};
      },
      kReductionTolerance);
}

TEST(CudaDense, Matmul) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const int seq_len = 40, sequences = 4, S = seq_len * sequences, I = 72, O = 56, groups = 3;
  const std::vector<float> x = random_floats(static_cast<size_t>(S) * I, 17);
  const std::vector<float> w = random_floats(static_cast<size_t>(I) * O, 18);
  const std::vector<float> bias = random_floats(O, 19);
  const std::vector<float> dy = random_floats(static_cast<size_t>(S) * O, 20);
  const std::vector<float> dx0 = random_floats(x.size(), 21);
  const std::vector<float> dw0 = random_floats(w.size(), 22);
  const std::vector<float> db0 = random_floats(O, 23);
  const std::vector<float> dwg0 = random_floats(groups * w.size(), 24);
  const std::vector<float> dbg0 = random_floats(static_cast<size_t>(groups) * O, 25);
  std::vector<float> y(static_cast<size_t>(S) * O), dx = dx0, dw = dw0, db = db0, dwg = dwg0,
                                                    dbg = dbg0, dx_groups = dx0;
  ops::matmul_forward(y.data(), x.data(), w.data(), bias.data(), S, I, O);
  ops::matmul_backward(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), S, I, O);
  {
    const ops::GradGroups<float> gw{dwg.data(), w.size(), groups, sequences, seq_len};
    const ops::GradGroups<float> gb{dbg.data(), static_cast<size_t>(O), groups, sequences, seq_len};
    ops::matmul_backward(dx_groups.data(), gw, &gb, dy.data(), x.data(), w.data(), I, O);
  }
  check_against_cpu(
      {y, dx, dw, db, dwg, dbg, dx_groups},
      [&] {
        Buffer<float> dxin = upload(x), dwt = upload(w), dbias = upload(bias), ddy = upload(dy);
        Buffer<float> dy_out = device_zeros<float>(y.size()), ddx = upload(dx0), ddw = upload(dw0);
        Buffer<float> ddb = upload(db0), ddwg = upload(dwg0), ddbg = upload(dbg0);
        Buffer<float> ddx_groups = upload(dx0);
        ops::cuda::matmul_forward(dy_out.data(), dxin.data(), dwt.data(), dbias.data(), S, I, O);
        ops::cuda::matmul_backward(ddx.data(), ddw.data(), ddb.data(), ddy.data(), dxin.data(),
                                   dwt.data(), S, I, O);
        const ops::GradGroups<float> gw{ddwg.data(), w.size(), groups, sequences, seq_len};
        const ops::GradGroups<float> gb{ddbg.data(), static_cast<size_t>(O), groups, sequences,
                                        seq_len};
        ops::cuda::matmul_backward(ddx_groups.data(), gw, &gb, ddy.data(), dxin.data(), dwt.data(),
                                   I, O);
        return Outputs{download(dy_out), download(ddx),  download(ddw),       download(ddb),
                       download(ddwg),   download(ddbg), download(ddx_groups)};
      },
      kReductionTolerance);
}

TEST(CudaDense, TreeSumGroupsIsTheCpusBits) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const int groups = 5;
  const size_t stride = 1000;
  const std::vector<std::pair<size_t, size_t>> ranges = {{0, 300}, {450, 550}};
  const std::vector<float> grads0 = random_floats(groups * stride, 26);
  std::vector<float> grads = grads0;
  ops::tree_sum_groups(grads.data(), stride, groups, ranges);
  // Elementwise adds in the CPU's tree: tolerance 0, i.e. the same bits.
  check_against_cpu(
      {grads},
      [&] {
        Buffer<float> d = upload(grads0);
        ops::cuda::tree_sum_groups(d.data(), stride, groups, ranges);
        return Outputs{download(d)};
      },
      0.0);
}

TEST(CudaDense, SiluModulationAndGatedResidual) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const int S = 33, D = 65;
  const size_t n = static_cast<size_t>(S) * D;
  const std::vector<float> a = random_floats(n, 27, 3.0), g = random_floats(n, 28);
  const std::vector<float> m = random_floats(3 * n, 29), acc0 = random_floats(n, 30);
  const std::vector<float> dm0 = random_floats(3 * n, 31);
  std::vector<float> silu(n), dsilu = acc0, u(n), dn = acc0, dm = dm0, x = acc0, x_plain = acc0,
                              dy(n), dm_gate = dm0, dy_plain(n);
  ops::silu_forward(silu.data(), a.data(), n);
  ops::silu_backward(dsilu.data(), g.data(), a.data(), n);
  ops::adaln_modulate_forward(u.data(), a.data(), m.data(), S, D);
  ops::adaln_modulate_backward(dn.data(), dm.data(), g.data(), a.data(), m.data(), S, D);
  ops::gated_residual_forward(x.data(), a.data(), m.data(), S, D);
  ops::gated_residual_forward(x_plain.data(), a.data(), static_cast<const float*>(nullptr), S, D);
  ops::gated_residual_backward(dy.data(), dm_gate.data(), g.data(), a.data(), m.data(), S, D);
  ops::gated_residual_backward(dy_plain.data(), static_cast<float*>(nullptr), g.data(), a.data(),
                               static_cast<const float*>(nullptr), S, D);
  check_against_cpu(
      {silu, dsilu, u, dn, dm, x, x_plain, dy, dm_gate, dy_plain},
      [&] {
        Buffer<float> da = upload(a), dg = upload(g), dmod = upload(m);
        Buffer<float> dsilu_out = device_zeros<float>(n), ddsilu = upload(acc0);
        Buffer<float> du = device_zeros<float>(n), ddn = upload(acc0), ddm = upload(dm0);
        Buffer<float> dx = upload(acc0), dx_plain = upload(acc0), ddy = device_zeros<float>(n);
        Buffer<float> ddm_gate = upload(dm0), ddy_plain = device_zeros<float>(n);
        ops::cuda::silu_forward(dsilu_out.data(), da.data(), n);
        ops::cuda::silu_backward(ddsilu.data(), dg.data(), da.data(), n);
        ops::cuda::adaln_modulate_forward(du.data(), da.data(), dmod.data(), S, D);
        ops::cuda::adaln_modulate_backward(ddn.data(), ddm.data(), dg.data(), da.data(),
                                           dmod.data(), S, D);
        ops::cuda::gated_residual_forward(dx.data(), da.data(), dmod.data(), S, D);
        ops::cuda::gated_residual_forward(dx_plain.data(), da.data(),
                                          static_cast<const float*>(nullptr), S, D);
        ops::cuda::gated_residual_backward(ddy.data(), ddm_gate.data(), dg.data(), da.data(),
                                           dmod.data(), S, D);
        ops::cuda::gated_residual_backward(ddy_plain.data(), static_cast<float*>(nullptr),
                                           dg.data(), da.data(), static_cast<const float*>(nullptr),
                                           S, D);
        return Outputs{download(dsilu_out), download(ddsilu),   download(du),       download(ddn),
                       download(ddm),       download(dx),       download(dx_plain), download(ddy),
                       download(ddm_gate),  download(ddy_plain)};
      },
      kElementwiseTolerance);
}

TEST(CudaDense, RopeAndEncodings) {
  LOOPMOE_REQUIRE_CUDA_DEVICE();
  const int B = 2, T = 17, H = 3, hd = 8, dc = 12;
  const size_t n = static_cast<size_t>(B) * T * 3 * H * hd, half = static_cast<size_t>(T) * hd / 2;
  const std::vector<float> qkv0 = random_floats(n, 32);
  std::vector<float> cos_t(half), sin_t(half), pe(dc), qkv = qkv0, dqkv = qkv0;
  ops::rope_tables(cos_t.data(), sin_t.data(), T, hd, 10000.0);
  ops::iteration_encoding(pe.data(), 3, dc);
  ops::rope_forward(qkv.data(), cos_t.data(), sin_t.data(), B, T, H, hd);
  ops::rope_backward(dqkv.data(), cos_t.data(), sin_t.data(), B, T, H, hd);
  // The tables and the encoding come from the same host code: the same bits.
  check_against_cpu(
      {cos_t, sin_t, pe},
      [&] {
        Buffer<float> dcos = device_zeros<float>(half), dsin = device_zeros<float>(half);
        Buffer<float> dpe = device_zeros<float>(dc);
        ops::cuda::rope_tables(dcos.data(), dsin.data(), T, hd, 10000.0);
        ops::cuda::iteration_encoding(dpe.data(), 3, dc);
        return Outputs{download(dcos), download(dsin), download(dpe)};
      },
      0.0);
  check_against_cpu(
      {qkv, dqkv},
      [&] {
        Buffer<float> dcos = upload(cos_t), dsin = upload(sin_t), dq = upload(qkv0),
                      ddq = upload(qkv0);
        ops::cuda::rope_forward(dq.data(), dcos.data(), dsin.data(), B, T, H, hd);
        ops::cuda::rope_backward(ddq.data(), dcos.data(), dsin.data(), B, T, H, hd);
        return Outputs{download(dq), download(ddq)};
      },
      kElementwiseTolerance);
}

}  // namespace
}  // namespace loopmoe::model
