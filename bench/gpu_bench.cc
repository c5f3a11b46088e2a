// loopmoe_bench --device cuda[:N]: the engine's training step on the GPU.
//
// What each number is:
// - bf16 GEMM rate: cublasGemmEx, 8192^3, A, B and C bf16, fp32 accumulation
//   (CUBLAS_COMPUTE_32F), CUBLAS_GEMM_DEFAULT, random data in [-1, 1); the mean over 10 timed
//   products after 3 warm-up ones (CUDA events around each), the MFU denominator. The best single
//   product is printed beside it.
// - tokens/s, ms/step: wall time of model::train_step (zero_grad, forward, backward, global-norm
//   clip, AdamW: what `loopmoe train` runs), a cudaDeviceSynchronize on each side, over the timed
//   steps after the warm-up ones; token generation on the host is outside the timing.
// - FLOPs per token: analytic, model::budget_figures(config, B*T).flops_per_token_train (every
//   matmul of forward + backward as the kernels execute it, attention over the full T×T block,
//   dropless routing); the CUDA backend has no FLOP counter. The engine computes in fp32
//   (CUBLAS_DEFAULT_MATH, no TF32), so MFU against the bf16 rate is what the issue asks for, not
//   what fp32 can reach.
// - peak memory: the high-water mark of the engine's device Buffers
//   (model::detail::device_peak_bytes, model/cuda/device_cuda.cu): parameters, gradients, AdamW
//   moments, activations, kernel temporaries; not the CUDA context, cuBLAS's own workspace or the
//   backend's grow-only workspace. It is the process's high-water mark (model/ has no reset), so a
//   per-case figure needs one case per process (scripts/gpu_check.sh does that). Beside it, the
//   device memory in use after the timed steps by cudaMemGetInfo (everything on the GPU, other
//   processes included), less what was in use before the model was built.
//
// cuBLAS is linked directly here (bench/CMakeLists.txt), unlike the engine, which dlopens it
// (model/cuda/cublas_loader.h: cuBLASLt's static TLS broke civetweb's metrics-server threads);
// loopmoe_bench runs no metrics server. Both end up with the same libcublas.so.
#include "bench/gpu_bench.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/clock.h"
#include "model/budget.h"
#include "model/buffer.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "model/rng.h"
#include "model/train_step.h"

namespace loopmoe::bench {
namespace {

using Clock = std::chrono::steady_clock;
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

void check_cuda(cudaError_t error, const char* call) {
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("loopmoe_bench: ") + call +
                             " failed: " + cudaGetErrorString(error));
  }
}

void check_cublas(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("loopmoe_bench: ") + call +
                             " failed: " + cublasGetStatusString(status));
  }
}

struct DeviceInfo {
  int ordinal = 0, sms = 0, driver = 0, runtime = 0, major = 0, minor = 0;
  std::string name;
  size_t total_bytes = 0;
};

DeviceInfo device_info() {
  DeviceInfo info;
  check_cuda(cudaGetDevice(&info.ordinal), "cudaGetDevice");
  cudaDeviceProp prop{};
  check_cuda(cudaGetDeviceProperties(&prop, info.ordinal), "cudaGetDeviceProperties");
  info.name = prop.name;
  info.sms = prop.multiProcessorCount;
  info.total_bytes = prop.totalGlobalMem;
  info.major = prop.major;
  info.minor = prop.minor;
  check_cuda(cudaDriverGetVersion(&info.driver), "cudaDriverGetVersion");
  check_cuda(cudaRuntimeGetVersion(&info.runtime), "cudaRuntimeGetVersion");
  return info;
}

size_t device_bytes_in_use() {
  size_t free_bytes = 0, total_bytes = 0;
  check_cuda(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  return total_bytes - free_bytes;
}

// Device memory that frees itself.
struct DeviceArray {
  void* p = nullptr;
  explicit DeviceArray(size_t bytes) { check_cuda(cudaMalloc(&p, bytes), "cudaMalloc"); }
  ~DeviceArray() { static_cast<void>(cudaFree(p)); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
};

struct GemmRate {
  int n = 8192, warmup = 3, reps = 10;
  double mean_tflops = 0, best_tflops = 0;
};

// bf16 of a float by truncation (the rate does not depend on the rounding of random data).
uint16_t to_bf16_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return static_cast<uint16_t>(bits >> 16);
}

GemmRate measure_bf16_gemm() {
  GemmRate rate;
  const int n = rate.n;
  const size_t elems = static_cast<size_t>(n) * n;
  std::vector<uint16_t> host(elems);
  loopmoe::model::Rng rng(7);
  DeviceArray a(elems * 2), b(elems * 2), c(elems * 2);
  for (DeviceArray* m : {&a, &b}) {
    for (uint16_t& v : host) {
      v = to_bf16_bits(static_cast<float>(rng.next_u64() >> 11) * 0x1.0p-52f - 1.0f);
    }
    check_cuda(cudaMemcpy(m->p, host.data(), elems * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  cublasHandle_t handle = nullptr;
  check_cublas(cublasCreate(&handle), "cublasCreate");
  cudaEvent_t start = nullptr, stop = nullptr;
  std::string failure;
  try {
    check_cuda(cudaEventCreate(&start), "cudaEventCreate");
    check_cuda(cudaEventCreate(&stop), "cudaEventCreate");
    const float alpha = 1.0f, beta = 0.0f;
    double total_ms = 0, best_ms = 1e30;
    for (int rep = 0; rep < rate.warmup + rate.reps; ++rep) {
      check_cuda(cudaEventRecord(start), "cudaEventRecord");
      check_cublas(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a.p, CUDA_R_16BF,
                                n, b.p, CUDA_R_16BF, n, &beta, c.p, CUDA_R_16BF, n,
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                   "cublasGemmEx (bf16, fp32 accumulation)");
      check_cuda(cudaEventRecord(stop), "cudaEventRecord");
      check_cuda(cudaEventSynchronize(stop), "cudaEventSynchronize");
      float ms = 0;
      check_cuda(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
      if (rep >= rate.warmup) {
        total_ms += ms;
        best_ms = std::min(best_ms, static_cast<double>(ms));
      }
    }
    const double flops = 2.0 * n * n * n;
    rate.mean_tflops = flops / (total_ms / rate.reps * 1e-3) / 1e12;
    rate.best_tflops = flops / (best_ms * 1e-3) / 1e12;
  } catch (const std::exception& e) {
    failure = e.what();
  }
  if (start != nullptr) static_cast<void>(cudaEventDestroy(start));
  if (stop != nullptr) static_cast<void>(cudaEventDestroy(stop));
  static_cast<void>(cublasDestroy(handle));
  if (!failure.empty()) throw std::runtime_error(failure);
  return rate;
}

struct CaseResult {
  int timed_steps = 0;
  double tokens_per_s = 0, step_ms = 0, warmup_s = 0, flops_per_token = 0, mfu = 0;
  double final_loss = 0;
  bool finite = true;
  size_t peak_bytes = 0, in_use_bytes = 0;
  Profile profile;
};

CaseResult measure_case(const model::Config& cfg, const GpuOptions& o, double gemm_tflops) {
  const size_t in_use_before = device_bytes_in_use();
  // The config's train.precision (bf16: cublasGemmEx on bf16 copies of the operands).
  const model::ops::MatmulPrecisionScope precision(
      model::ops::parse_matmul_precision(cfg.train.precision));
  model::Model m(cfg.model);
  m.set_grad_groups(cfg.train.grad_groups);
  m.init_params(cfg.train.seed);
  model::AdamW adam(m.layout(), cfg.train);
  const model::FinishGradients finish = model::clip_locally(m.num_params(), cfg.train.grad_clip);
  const int B = cfg.train.batch_size, T = cfg.model.seq_len;
  std::vector<int32_t> in(static_cast<size_t>(B) * T), tg(in.size());
  model::Rng rng(1);
  // Training step s on the current in/tg, up to the end of its kernels (the caller synchronises
  // before it): the timed steps and the profiled ones.
  const auto step = [&](int s) {
    const model::StepOutcome out =
        model::train_step(m, adam, cfg.train, s, {in.data(), tg.data(), B, T}, finish);
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    return out;
  };
  CaseResult r;
  double timed = 0;
  const auto warmup_start = Clock::now();
  for (int s = 0; s < o.warmup + o.steps; ++s) {
    if (s >= o.warmup && o.max_seconds > 0 && r.timed_steps > 0 && timed >= o.max_seconds) break;
    if (s == o.warmup) r.warmup_s = common::seconds_since(warmup_start);
    for (size_t i = 0; i < in.size(); ++i) {
      in[i] = static_cast<int32_t>(rng.next_u64() % cfg.model.vocab_size);
      tg[i] = static_cast<int32_t>(rng.next_u64() % cfg.model.vocab_size);
    }
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    const auto t0 = Clock::now();
    const model::StepOutcome out = step(s);
    const double dt = common::seconds_since(t0);
    if (s >= o.warmup) {
      timed += dt;
      ++r.timed_steps;
    }
    r.final_loss = out.loss.total;
    r.finite = r.finite && !out.nonfinite && std::isfinite(out.loss.total);
  }
  // The op profile after the timed steps (which it would slow down), on the same inputs' kind.
  r.profile = profile_steps(o.profile_steps, [&](int i) {
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    step(o.warmup + r.timed_steps + i);
  });
  const size_t in_use_after = device_bytes_in_use();
  r.in_use_bytes = in_use_after - std::min(in_use_before, in_use_after);
  r.peak_bytes = model::detail::device_peak_bytes();
  if (r.timed_steps > 0) {
    r.step_ms = 1e3 * timed / r.timed_steps;
    r.tokens_per_s = static_cast<double>(B) * T * r.timed_steps / timed;
  }
  r.flops_per_token = model::budget_figures(cfg.model, B * T).flops_per_token_train;
  r.mfu = r.tokens_per_s * r.flops_per_token / (gemm_tflops * 1e12);
  return r;
}

}  // namespace

int run_gpu(const std::vector<Case>& cases, const GpuOptions& o) {
  if (o.steps < 1) throw std::runtime_error("--steps must be at least 1");
  const DeviceInfo info = device_info();
  const GemmRate gemm = measure_bf16_gemm();
  const char* peak_note =
      "peak: high-water mark of the engine's device Buffers in this process (parameters, "
      "gradients, AdamW moments, activations, temporaries; not the CUDA context or cuBLAS "
      "workspaces)";
  if (o.json) {
    print_json_line(
        {{"kind", "device"},
         {"device", o.device},
         {"name", info.name},
         {"sms", info.sms},
         {"compute_capability", std::to_string(info.major) + "." + std::to_string(info.minor)},
         {"memory_bytes", info.total_bytes},
         {"driver", info.driver},
         {"runtime", info.runtime}});
    print_json_line({{"kind", "gemm"},
                     {"what", "cublasGemmEx bf16 in/out, fp32 accumulation, CUBLAS_GEMM_DEFAULT"},
                     {"n", gemm.n},
                     {"warmup", gemm.warmup},
                     {"reps", gemm.reps},
                     {"mean_tflops", gemm.mean_tflops},
                     {"best_tflops", gemm.best_tflops}});
  } else {
    std::printf(
        "device %s: %s, %d SMs, %.1f GiB, compute capability %d.%d, driver %d, runtime %d\n",
        o.device.c_str(), info.name.c_str(), info.sms, info.total_bytes / kGiB, info.major,
        info.minor, info.driver, info.runtime);
    std::printf(
        "bf16 GEMM %d^3 (cublasGemmEx, bf16 in/out, fp32 accumulation): %.1f TFLOP/s, the mean "
        "of %d after %d warm-up (best %.1f): the MFU denominator\n\n",
        gemm.n, gemm.mean_tflops, gemm.reps, gemm.warmup, gemm.best_tflops);
    std::printf("%-28s %6s %6s %11s %9s %6s %12s %7s %9s %9s %9s\n", "case", "batch", "T",
                "tokens/s", "step ms", "steps", "GFLOP/token", "MFU", "peak GiB", "used GiB",
                "loss");
  }
  int exit_code = 0;
  for (const Case& c : cases) {
    const CaseResult r = measure_case(c.cfg, o, gemm.mean_tflops);
    if (!r.finite) exit_code = 1;
    if (o.json) {
      print_json_line({{"kind", "case"},
                       {"device", o.device},
                       {"gpu", info.name},
                       {"case", c.name},
                       {"config", c.path},
                       {"batch", c.cfg.train.batch_size},
                       {"seq_len", c.cfg.model.seq_len},
                       {"precision", c.cfg.train.precision},
                       {"steps", r.timed_steps},
                       {"warmup", o.warmup},
                       {"warmup_s", r.warmup_s},
                       {"tokens_per_s", r.tokens_per_s},
                       {"step_ms", r.step_ms},
                       {"flops_per_token", r.flops_per_token},
                       {"flops_source", "analytic (model/budget.h)"},
                       {"mfu", r.mfu},
                       {"mfu_denominator_tflops", gemm.mean_tflops},
                       {"peak_bytes", r.peak_bytes},
                       {"peak_source", "engine Buffer high-water mark, process-wide"},
                       {"in_use_bytes", r.in_use_bytes},
                       {"in_use_source", "cudaMemGetInfo after the steps, less before the model"},
                       {"final_loss", r.finite ? nlohmann::json(r.final_loss) : nullptr},
                       {"finite", r.finite}});
    } else {
      const std::string name =
          model::precision_is_default(c.cfg.train) ? c.name : c.name + " " + c.cfg.train.precision;
      std::printf("%-28s %6d %6d %11.0f %9.2f %6d %12.4f %6.1f%% %9.2f %9.2f %9.4f%s\n",
                  name.c_str(), c.cfg.train.batch_size, c.cfg.model.seq_len, r.tokens_per_s,
                  r.step_ms, r.timed_steps, r.flops_per_token / 1e9, 100 * r.mfu,
                  r.peak_bytes / kGiB, r.in_use_bytes / kGiB, r.final_loss,
                  r.finite ? "" : "  NOT FINITE");
    }
    if (o.profile_steps > 0) print_profile(c.name, o.device, r.profile, o.json);
    if (o.no_torch) continue;
    for (const std::string& variant : o.peer_variants) {
      PeerRequest request;
      request.python = o.python;
      request.script = o.peer;
      request.config = c.path;
      request.steps = o.torch_steps;
      request.threads = 1;
      request.batch = c.cfg.train.batch_size;
      request.device = o.device;
      request.variant = variant;
      request.max_seconds = o.max_seconds;
      request.keep_stderr = true;
      const nlohmann::json result = run_peer(request);
      const double t = peer_tokens_per_s(result);
      if (o.json) {
        print_json_line({{"kind", "peer"},
                         {"case", c.name},
                         {"variant", variant},
                         {"ok", t > 0},
                         {"result", result}});
      } else if (t > 0) {
        std::printf("%-28s %6d %6d %11.0f %9.2f   (PyTorch peer, %s; engine %.2fx)\n",
                    c.name.c_str(), c.cfg.train.batch_size, c.cfg.model.seq_len, t,
                    result.value("step_ms", 0.0), variant.c_str(), r.tokens_per_s / t);
      } else {
        std::printf("%-28s %6d %6d %11s %9s   (PyTorch peer, %s: FAILED)\n", c.name.c_str(),
                    c.cfg.train.batch_size, c.cfg.model.seq_len, "-", "-", variant.c_str());
      }
    }
  }
  if (!o.json) {
    std::printf(
        "\nGFLOP/token: analytic (model/budget.h), forward + backward matmuls, full T×T "
        "attention scores. The engine computes in fp32; MFU is against the bf16 rate "
        "above.\n%s%s\n",
        peak_note,
        cases.size() > 1 ? "; with several cases, a later case's peak includes the earlier ones'"
                         : "");
  }
  return exit_code;
}

}  // namespace loopmoe::bench
