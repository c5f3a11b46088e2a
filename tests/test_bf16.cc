// train.precision = "bf16" (ops.h MatmulPrecision): the rounding of model/bf16.h bit by bit, the
// CPU emulation of the bf16 matrix product (the oracle of the CUDA backend's, tests/cuda/
// test_cuda_bf16.cc), the config key, and bf16 training: finite, close to fp32, deterministic,
// resumable, and the same bits on the emulated device.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "model/bf16.h"
#include "model/config.h"
#include "model/error.h"
#include "model/ops.h"
#include "tests/device/device_run.h"
#include "tests/tiny_run.h"
#include "train/trainer.h"

namespace loopmoe {
namespace {

namespace fs = std::filesystem;
using model::bf16_round_bits;
using model::round_to_bf16;
using model::ops::MatmulPrecision;
using model::ops::MatmulPrecisionScope;

uint32_t rounded(uint32_t bits) {
  return std::bit_cast<uint32_t>(round_to_bf16(std::bit_cast<float>(bits)));
}

// The rounding is constexpr: these hold at compile time.
static_assert(round_to_bf16(1.0f) == 1.0f);
static_assert(bf16_round_bits(0x3F808000u) == 0x3F800000u);  // tie, even below: down
static_assert(bf16_round_bits(0x3F818000u) == 0x3F820000u);  // tie, odd below: up
static_assert(bf16_round_bits(0x7F7FFFFFu) == 0x7F800000u);  // FLT_MAX: overflows to inf

TEST(Bf16Round, NearestWithTiesToEven) {
  // 1 + 2^-8 lies halfway between bf16 1.0 (0x3F80, mantissa even) and 0x3F81: down to even.
  EXPECT_EQ(rounded(0x3F808000u), 0x3F800000u);
  // Halfway between 0x3F81 (odd) and 0x3F82: up to even.
  EXPECT_EQ(rounded(0x3F818000u), 0x3F820000u);
  // Just below and above halfway.
  EXPECT_EQ(rounded(0x3F807FFFu), 0x3F800000u);
  EXPECT_EQ(rounded(0x3F808001u), 0x3F810000u);
  // Negative values round by magnitude, the same way.
  EXPECT_EQ(rounded(0xBF808000u), 0xBF800000u);
  EXPECT_EQ(rounded(0xBF818000u), 0xBF820000u);
  EXPECT_EQ(rounded(0xBF808001u), 0xBF810000u);
  // Already bf16: unchanged.
  EXPECT_EQ(rounded(0x40490000u), 0x40490000u);
  EXPECT_EQ(round_to_bf16(3.140625f), 3.140625f);
}

TEST(Bf16Round, CarryIntoTheNextExponent) {
  // 1.99999988 (0x3FFFFFFF): the mantissa overflows, 2.0.
  EXPECT_EQ(rounded(0x3FFFFFFFu), 0x40000000u);
  EXPECT_EQ(round_to_bf16(std::bit_cast<float>(0x3FFFFFFFu)), 2.0f);
  // A tie whose lower neighbour (0x3FFF) is odd: up, into the next binade.
  EXPECT_EQ(rounded(0x3FFF8000u), 0x40000000u);
  EXPECT_EQ(rounded(0xBFFF8000u), 0xC0000000u);
}

TEST(Bf16Round, OverflowGoesToInfinity) {
  // The largest finite bf16 is 0x7F7F (3.3895e38). fp32 values from halfway to 2^128 round to inf
  // (IEEE round-to-nearest, as __float2bfloat16_rn): FLT_MAX among them.
  EXPECT_EQ(rounded(0x7F7FFFFFu), 0x7F800000u);
  EXPECT_EQ(rounded(0xFF7FFFFFu), 0xFF800000u);
  EXPECT_TRUE(std::isinf(round_to_bf16(std::numeric_limits<float>::max())));
  EXPECT_EQ(rounded(0x7F7F8000u), 0x7F800000u);  // tie above 0x7F7F (odd): up, to inf
  EXPECT_EQ(rounded(0x7F7F7FFFu), 0x7F7F0000u);  // below halfway: the largest finite
  EXPECT_EQ(rounded(0x7F7F0000u), 0x7F7F0000u);
}

TEST(Bf16Round, DenormalsRoundLikeAnyValue) {
  EXPECT_EQ(rounded(0x00000001u), 0x00000000u);  // the smallest denormal: +0
  EXPECT_EQ(rounded(0x80000001u), 0x80000000u);  // its negative: -0 (sign kept)
  EXPECT_EQ(rounded(0x00008000u), 0x00000000u);  // tie with 0 (even): 0
  EXPECT_EQ(rounded(0x00018000u), 0x00020000u);  // tie above 0x0001 (odd): up
  EXPECT_EQ(rounded(0x00010001u), 0x00010000u);  // a bf16 denormal plus a little: itself
  EXPECT_EQ(rounded(0x00010000u), 0x00010000u);  // bf16's smallest denormal stays
  EXPECT_EQ(rounded(0x007FFFFFu), 0x00800000u);  // fp32's largest denormal: FLT_MIN
  EXPECT_EQ(rounded(0x807FFFFFu), 0x80800000u);
}

TEST(Bf16Round, SpecialValues) {
  EXPECT_EQ(rounded(0x00000000u), 0x00000000u);  // +0
  EXPECT_EQ(rounded(0x80000000u), 0x80000000u);  // -0
  EXPECT_EQ(rounded(0x7F800000u), 0x7F800000u);  // +inf
  EXPECT_EQ(rounded(0xFF800000u), 0xFF800000u);  // -inf
  // NaN stays NaN, quiet, sign and upper payload kept; a payload only in the dropped low bits
  // (which plain rounding would turn into inf) included.
  EXPECT_EQ(rounded(0x7FC00000u), 0x7FC00000u);
  EXPECT_EQ(rounded(0x7F800001u), 0x7FC00000u);
  EXPECT_EQ(rounded(0xFF800001u), 0xFFC00000u);
  EXPECT_EQ(rounded(0x7FFFFFFFu), 0x7FFF0000u);
  EXPECT_EQ(rounded(0xFF812345u), 0xFFC10000u);
  EXPECT_TRUE(std::isnan(round_to_bf16(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(std::isnan(round_to_bf16(std::numeric_limits<float>::signaling_NaN())));
}

TEST(Bf16Round, BulkAndPackedMatchTheScalar) {
  std::vector<float> x(300);
  std::mt19937 gen(3);
  for (float& v : x) v = std::bit_cast<float>(static_cast<uint32_t>(gen()));
  std::vector<float> bulk(x.size());
  model::round_to_bf16(x.data(), bulk.data(), x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_EQ(std::bit_cast<uint32_t>(bulk[i]), bf16_round_bits(std::bit_cast<uint32_t>(x[i])));
  }
  // 10 rows of 7 out of a leading dimension of 30.
  std::vector<float> packed(70);
  model::round_to_bf16_packed(x.data(), 30, 10, 7, packed.data());
  for (size_t r = 0; r < 10; ++r) {
    for (size_t c = 0; c < 7; ++c) {
      EXPECT_EQ(std::bit_cast<uint32_t>(packed[r * 7 + c]),
                std::bit_cast<uint32_t>(bulk[r * 30 + c]));
    }
  }
}

TEST(Bf16Precision, ParseAndScope) {
  EXPECT_EQ(model::ops::parse_matmul_precision("fp32"), MatmulPrecision::kFp32);
  EXPECT_EQ(model::ops::parse_matmul_precision("bf16"), MatmulPrecision::kBf16);
  EXPECT_THROW(model::ops::parse_matmul_precision("fp16"), std::invalid_argument);
  EXPECT_STREQ(model::ops::to_string(MatmulPrecision::kBf16), "bf16");
  EXPECT_EQ(model::ops::matmul_precision(), MatmulPrecision::kFp32);  // the default
  {
    MatmulPrecisionScope scope(MatmulPrecision::kBf16);
    EXPECT_EQ(model::ops::matmul_precision(), MatmulPrecision::kBf16);
  }
  EXPECT_EQ(model::ops::matmul_precision(), MatmulPrecision::kFp32);
}

// A row-major operand stored as rows x cols with leading dimension ld (> cols: the gaps hold
// garbage that a correct product never reads).
std::vector<float> random_matrix(int rows, int ld, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> m(static_cast<size_t>(rows) * ld);
  for (float& x : m) x = normal(gen);
  return m;
}

struct GemmCase {
  bool ta, tb;
  int m, n, k;
  float alpha, beta;
};

// The bf16 product against a double-accumulated product of the rounded operands, within fp32
// accumulation error; bit-equal to the fp32 product of pre-rounded operands (what the emulation
// is); and NOT equal to the fp32 product of the operands themselves (a no-op would be caught).
TEST(Bf16Gemm, CpuEmulationIsTheProductOfRoundedOperands) {
  const GemmCase cases[] = {{false, false, 37, 29, 53, 1.f, 0.f},
                            {true, false, 16, 40, 70, 0.5f, 1.f},
                            {false, true, 25, 18, 96, 1.f, 0.25f},
                            {true, true, 9, 33, 41, -2.f, 0.f},
                            {false, false, 1, 1, 300, 1.f, 0.f}};
  uint64_t seed = 1;
  for (const GemmCase& g : cases) {
    SCOPED_TRACE(::testing::Message() << "ta " << g.ta << " tb " << g.tb << " m " << g.m << " n "
                                      << g.n << " k " << g.k);
    const int a_rows = g.ta ? g.k : g.m, a_cols = g.ta ? g.m : g.k;
    const int b_rows = g.tb ? g.n : g.k, b_cols = g.tb ? g.k : g.n;
    const int lda = a_cols + 3, ldb = b_cols + 5, ldc = g.n + 2;
    const std::vector<float> a = random_matrix(a_rows, lda, seed++);
    const std::vector<float> b = random_matrix(b_rows, ldb, seed++);
    const std::vector<float> c0 = random_matrix(g.m, ldc, seed++);
    std::vector<float> a16(a.size()), b16(b.size());
    model::round_to_bf16(a.data(), a16.data(), a.size());
    model::round_to_bf16(b.data(), b16.data(), b.size());

    std::vector<float> bf16 = c0, fp32 = c0, fp32_of_rounded = c0;
    {
      MatmulPrecisionScope scope(MatmulPrecision::kBf16);
      model::ops::gemm<float>(g.ta, g.tb, g.m, g.n, g.k, g.alpha, a.data(), lda, b.data(), ldb,
                              g.beta, bf16.data(), ldc);
    }
    model::ops::gemm<float>(g.ta, g.tb, g.m, g.n, g.k, g.alpha, a.data(), lda, b.data(), ldb,
                            g.beta, fp32.data(), ldc);
    model::ops::gemm<float>(g.ta, g.tb, g.m, g.n, g.k, g.alpha, a16.data(), lda, b16.data(), ldb,
                            g.beta, fp32_of_rounded.data(), ldc);

    double max_diff_from_fp32 = 0, scale = 0;
    for (int i = 0; i < g.m; ++i) {
      for (int j = 0; j < g.n; ++j) {
        double acc = 0, abs_acc = 0;
        for (int p = 0; p < g.k; ++p) {
          const double av = g.ta ? a16[p * lda + i] : a16[i * lda + p];
          const double bv = g.tb ? b16[j * ldb + p] : b16[p * ldb + j];
          acc += av * bv;
          abs_acc += std::abs(av * bv);
        }
        const size_t at = static_cast<size_t>(i) * ldc + j;
        const double want = g.alpha * acc + (g.beta == 0 ? 0.0 : g.beta * c0[at]);
        // fp32 accumulation: at most k roundings of partial sums bounded by Σ|a||b|, then alpha
        // and beta·C.
        const double bound = 0x1p-24 * (g.k + 2) * (std::abs(g.alpha) * abs_acc) +
                             0x1p-23 * std::abs(g.beta * c0[at]) + 1e-30;
        EXPECT_LE(std::abs(bf16[at] - want), bound) << "element " << i << "," << j;
        EXPECT_EQ(std::bit_cast<uint32_t>(bf16[at]), std::bit_cast<uint32_t>(fp32_of_rounded[at]))
            << "element " << i << "," << j;
        max_diff_from_fp32 = std::max(max_diff_from_fp32, std::abs(double(bf16[at]) - fp32[at]));
        scale = std::max(scale, std::abs(double(fp32[at])));
      }
    }
    // Rounding the operands to 8 significant bits moves the product by ~2^-9 relative per term.
    EXPECT_GT(max_diff_from_fp32, 1e-4 * scale);
    // The gaps between rows (and C outside its n columns) are untouched.
    for (int i = 0; i < g.m; ++i) {
      for (int j = g.n; j < ldc; ++j) {
        EXPECT_EQ(bf16[static_cast<size_t>(i) * ldc + j], c0[static_cast<size_t>(i) * ldc + j]);
      }
    }
  }
}

// A product large enough to be split over threads (ops_gemm.cc: m·n·k >= 4e6) gives the bits of
// the single-threaded one, in bf16 as in fp32 (batch invariance).
TEST(Bf16Gemm, ThreadSplitKeepsTheBits) {
  const int m = 192, n = 160, k = 144;
  const std::vector<float> a = random_matrix(m, k, 11), b = random_matrix(k, n, 12);
  MatmulPrecisionScope scope(MatmulPrecision::kBf16);
  std::vector<float> one(static_cast<size_t>(m) * n), two(one.size());
  model::set_num_threads(1);
  model::ops::gemm<float>(false, false, m, n, k, 1.f, a.data(), k, b.data(), n, 0.f, one.data(), n);
  model::set_num_threads(2);
  model::ops::gemm<float>(false, false, m, n, k, 1.f, a.data(), k, b.data(), n, 0.f, two.data(), n);
  model::set_num_threads(1);
  EXPECT_TRUE(device_testing::same_bits(one, two));
  // A block of rows computed alone equals the same rows of the whole product.
  std::vector<float> rows(static_cast<size_t>(7) * n);
  model::ops::gemm<float>(false, false, 7, n, k, 1.f, a.data() + 50 * k, k, b.data(), n, 0.f,
                          rows.data(), n);
  EXPECT_TRUE(device_testing::same_bits(
      rows, std::vector<float>(one.begin() + 50 * n, one.begin() + 57 * n)));
}

TEST(Bf16Config, ParsesAndRoundTrips) {
  const model::Config c = model::parse_config("[train]\nprecision = \"bf16\"\n", "t.toml");
  EXPECT_EQ(c.train.precision, "bf16");
  const std::string text = model::to_toml(c);
  EXPECT_NE(text.find("precision = \"bf16\"\n"), std::string::npos) << text;
  EXPECT_EQ(model::to_toml(model::parse_config(text, "canonical")), text);
  EXPECT_NE(model::train_to_json(c.train).find("\"precision\": \"bf16\""), std::string::npos);
}

TEST(Bf16Config, Fp32IsTheDefaultAndLeavesTheCanonicalTextAsItWas) {
  const model::Config defaults;
  EXPECT_EQ(defaults.train.precision, "fp32");
  const std::string text = model::to_toml(defaults);
  EXPECT_EQ(text.find("precision"), std::string::npos) << text;
  EXPECT_EQ(model::train_to_json(defaults.train).find("precision"), std::string::npos);
  // Written explicitly, fp32 gives the very text of a config that never mentions it.
  const model::Config explicit_fp32 =
      model::parse_config("[train]\nprecision = \"fp32\"\n", "t.toml");
  EXPECT_EQ(model::to_toml(explicit_fp32), text);
}

TEST(Bf16Config, BadValuesAreOneErrorNamingTheKey) {
  for (const char* bad : {"\"fp16\"", "\"BF16\"", "\"\""}) {
    try {
      model::parse_config(std::string("[train]\nprecision = ") + bad + "\n", "bad.toml");
      ADD_FAILURE() << bad << " was accepted";
    } catch (const model::ConfigError& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("bad.toml: "), std::string::npos) << what;
      EXPECT_NE(what.find("train.precision"), std::string::npos) << what;
      EXPECT_NE(what.find("expected fp32 or bf16"), std::string::npos) << what;
    }
  }
  EXPECT_THROW(model::parse_config("[train]\nprecision = 16\n", "bad.toml"), model::ConfigError);
}

class Bf16Training : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = testing::fresh_test_dir(
        "loopmoe_bf16", ::testing::UnitTest::GetInstance()->current_test_info()->name());
    testing::write_pattern_corpus(root_ / "data");
    config_ = testing::tiny_loopmoe_config(root_ / "data");
    config_.train.steps = 40;
    config_.train.lr = 1e-2;
    config_.train.eval_interval = 0;
    config_.train.checkpoint_interval = 0;
  }
  void TearDown() override { fs::remove_all(root_); }

  train::TrainResult run(const std::string& precision, const std::string& name, int stop_after = -1,
                         bool resume = false) {
    model::Config c = config_;
    c.train.precision = precision;
    train::TrainOptions o;
    o.out_dir = (root_ / name).string();
    o.progress = false;
    o.stop_after = stop_after;
    o.resume = resume;
    return train::run_training(c, o);
  }
  std::string read_all(const std::string& name) const {
    std::ifstream in(root_ / name / "checkpoint.bin", std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  static double tail_mean(const std::vector<double>& losses) {
    double sum = 0;
    for (size_t i = losses.size() - 5; i < losses.size(); ++i) sum += losses[i];
    return sum / 5;
  }

  fs::path root_;
  model::Config config_;
};

// 40 steps of the tiny LoopMoE: finite, within a few percent of fp32 at the end (and not its
// bits: the products really are bf16), the same bits twice, and the process's precision restored.
TEST_F(Bf16Training, TracksFp32AndIsDeterministic) {
  const train::TrainResult fp32 = run("fp32", "fp32");
  const train::TrainResult a = run("bf16", "a");
  EXPECT_EQ(model::ops::matmul_precision(), MatmulPrecision::kFp32);
  const train::TrainResult b = run("bf16", "b");
  ASSERT_EQ(a.losses.size(), 40u);
  for (double loss : a.losses) EXPECT_TRUE(std::isfinite(loss));
  EXPECT_EQ(a.losses, b.losses);  // bit-identical
  EXPECT_EQ(read_all("a"), read_all("b"));
  EXPECT_NE(a.losses, fp32.losses);
  const double fp32_end = tail_mean(fp32.losses), bf16_end = tail_mean(a.losses);
  EXPECT_NEAR(bf16_end, fp32_end, 0.05 * fp32_end) << "fp32 " << fp32_end << " bf16 " << bf16_end;
  EXPECT_NEAR(a.final_val_loss, fp32.final_val_loss, 0.05 * fp32.final_val_loss);
  std::printf(
      "tiny LoopMoE, 40 steps: last-5 mean loss fp32 %.6f bf16 %.6f (%.2f%%); "
      "validation fp32 %.6f bf16 %.6f\n",
      fp32_end, bf16_end, 100 * (bf16_end - fp32_end) / fp32_end, fp32.final_val_loss,
      a.final_val_loss);
}

// The precision is part of the run's config: a bf16 run resumes bit-exactly, and an fp32 resume
// of it is refused as any other config change.
TEST_F(Bf16Training, ResumesBitExactlyAndRefusesAnotherPrecision) {
  const train::TrainResult straight = run("bf16", "straight");
  const train::TrainResult part1 = run("bf16", "split", 15);
  const train::TrainResult part2 = run("bf16", "split", -1, true);
  std::vector<double> joined = part1.losses;
  joined.insert(joined.end(), part2.losses.begin(), part2.losses.end());
  EXPECT_EQ(joined, straight.losses);
  EXPECT_EQ(read_all("split"), read_all("straight"));
  run("bf16", "mixed", 10);
  try {
    run("fp32", "mixed", -1, true);
    ADD_FAILURE() << "an fp32 resume of a bf16 run was accepted";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("precision"), std::string::npos) << e.what();
  }
}

// The emulated device (CPU kernels behind the device seam) gives the CPU's bf16 bits.
TEST(Bf16Device, HostAsDeviceMatchesTheCpuBitForBit) {
  const model::Config cfg = device_testing::variant_config(device_testing::tiny_variants()[4]);
  MatmulPrecisionScope scope(MatmulPrecision::kBf16);
  const device_testing::RunResult cpu = device_testing::train(cfg, model::Device::kCpu);
  const device_testing::RunResult emulated =
      device_testing::train(cfg, model::Device::kHostAsDevice);
  EXPECT_TRUE(device_testing::same_bits(cpu.losses, emulated.losses));
  EXPECT_TRUE(device_testing::same_bits(cpu.params, emulated.params));
  EXPECT_TRUE(device_testing::same_bits(cpu.logits, emulated.logits));
}

}  // namespace
}  // namespace loopmoe
