// Training throughput and model-FLOPs utilisation of the engine on a config.
//
// --device cpu (the default): at 1 and 2 threads, against the sgemm rate measured in the same run
// and the PyTorch peer (bench/torch_peer.py) on the identical config.
// --device cuda[:N]: on the GPU (bench/gpu_bench.cc), against the bf16 cuBLAS GEMM rate measured
// in the same run, with peak GPU memory, and optionally the peer's --device cuda variants.
// Random tokens: the data pipeline is not what is measured here.
#include <cblas.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench/bench_common.h"
#include "common/clock.h"
#include "common/run_main.h"
#include "model/budget.h"
#include "model/config.h"
#include "model/cpu/sgemm.h"
#include "model/device.h"
#include "model/model.h"
#include "model/ops.h"
#include "model/optimizer.h"
#include "model/rng.h"
#if defined(LOOPMOE_HAVE_CUDA)
#include "bench/gpu_bench.h"
#endif

namespace {

using Clock = std::chrono::steady_clock;
using loopmoe::bench::Case;

// Best-of-10 rate of a 2048^3 product with `threads` threads, by the engine's sgemm (ops::gemm,
// model/cpu/sgemm) and by OpenBLAS's cblas_sgemm (whatever kernel it picked on this machine).
struct Peak {
  double engine = 0, openblas = 0;
  double best() const { return std::max(engine, openblas); }
};
Peak sgemm_gflops(int threads) {
  loopmoe::model::set_num_threads(threads);
  openblas_set_num_threads(threads);
  const int n = 2048;
  std::vector<float> a(n * n, 0.5f), b(n * n, 0.25f), c(n * n);
  Peak p;
  for (int rep = 0; rep < 10; ++rep) {
    auto t0 = Clock::now();
    loopmoe::model::ops::gemm<float>(false, false, n, n, n, 1.f, a.data(), n, b.data(), n, 0.f,
                                     c.data(), n);
    p.engine = std::max(p.engine, 2.0 * n * n * n / loopmoe::common::seconds_since(t0) / 1e9);
    t0 = Clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.f, a.data(), n, b.data(), n,
                0.f, c.data(), n);
    p.openblas = std::max(p.openblas, 2.0 * n * n * n / loopmoe::common::seconds_since(t0) / 1e9);
  }
  openblas_set_num_threads(1);
  loopmoe::model::set_num_threads(1);
  return p;
}

struct Measured {
  double tokens_per_s = 0, step_ms = 0, flops_per_token = 0;
  loopmoe::bench::Profile profile;
};

Measured measure(const loopmoe::model::Config& cfg, int threads, int steps, int warmup,
                 int profile_steps) {
  loopmoe::model::set_num_threads(threads);
  // The config's train.precision, as `loopmoe train` runs it (bf16: the CPU emulation).
  const loopmoe::model::ops::MatmulPrecisionScope precision(
      loopmoe::model::ops::parse_matmul_precision(cfg.train.precision));
  loopmoe::model::Model model(cfg.model);
  model.set_grad_groups(cfg.train.grad_groups);
  model.init_params(cfg.train.seed);
  loopmoe::model::AdamW adam(model.layout(), cfg.train);
  const int B = cfg.train.batch_size, T = cfg.model.seq_len;
  std::vector<int32_t> in(static_cast<size_t>(B) * T), tg(in.size());
  loopmoe::model::Rng rng(1);
  // One training step on the current in/tg: the timed steps and the profiled ones.
  const auto step = [&] {
    model.zero_grad();
    model.forward(in.data(), tg.data(), B, T);
    model.backward();
    loopmoe::model::clip_grad_norm(model.grads(), model.num_params(), cfg.train.grad_clip);
    adam.step(model.params(), model.grads(), 1e-3);
  };
  Measured m;
  double total = 0;
  for (int s = 0; s < warmup + steps; ++s) {
    for (size_t i = 0; i < in.size(); ++i) {
      in[i] = static_cast<int32_t>(rng.next_u64() % cfg.model.vocab_size);
      tg[i] = static_cast<int32_t>(rng.next_u64() % cfg.model.vocab_size);
    }
    loopmoe::model::ops::reset_gemm_flops();
    auto t0 = Clock::now();
    step();
    const double dt = loopmoe::common::seconds_since(t0);
    if (s >= warmup) total += dt;
    m.flops_per_token = static_cast<double>(loopmoe::model::ops::gemm_flops()) / (B * T);
  }
  m.step_ms = 1e3 * total / steps;
  m.tokens_per_s = static_cast<double>(B) * T * steps / total;
  m.profile = loopmoe::bench::profile_steps(profile_steps, [&](int) { step(); });
  return m;
}

struct CpuOptions {
  int steps = 10, warmup = 2, torch_steps = 10;
  std::string peer;
  bool no_torch = false, json = false;
  std::vector<int> thread_counts = {1, 2};
  int profile_steps = 0;  // --profile
};

// The text output's first lines, as they always were.
void print_sgemm_header(const Peak& p1, const Peak& p2, double peak1, double peak) {
  std::printf(
      "sgemm 2048^3, GFLOP/s: engine (model/cpu/sgemm, %s) %.1f with 1 thread, %.1f with 2;\n"
      "OpenBLAS (%s) %.1f with 1 thread, %.1f with 2. MFU denominators for 1 and 2 threads: the\n"
      "better of the two at the same thread count (%.1f, %.1f)\n\n",
      loopmoe::model::ops::cpu::sgemm_kernel_name(), p1.engine, p2.engine, openblas_get_corename(),
      p1.openblas, p2.openblas, peak1, peak);
  std::printf("%-22s %7s %11s %9s %12s %7s\n", "config", "threads", "tokens/s", "step ms",
              "GFLOP/token", "MFU");
}

// A case's name in the tables, with its precision when it is not the default fp32.
std::string shown_name(const Case& c) {
  return loopmoe::model::precision_is_default(c.cfg.train) ? c.name
                                                           : c.name + " " + c.cfg.train.precision;
}

// The CPU benchmark; without --batch or --json its output is what it always was.
int run_cpu(const std::vector<Case>& cases, const CpuOptions& o) {
  const Peak p1 = sgemm_gflops(1), p2 = sgemm_gflops(2);
  const double peak1 = p1.best(), peak = std::max(peak1, p2.best());
  if (o.json) {
    loopmoe::bench::print_json_line({{"kind", "sgemm"},
                                     {"device", "cpu"},
                                     {"n", 2048},
                                     {"kernel", loopmoe::model::ops::cpu::sgemm_kernel_name()},
                                     {"engine_gflops", {{"1", p1.engine}, {"2", p2.engine}}},
                                     {"openblas_gflops", {{"1", p1.openblas}, {"2", p2.openblas}}},
                                     {"openblas_core", openblas_get_corename()}});
  } else {
    print_sgemm_header(p1, p2, peak1, peak);
  }
  struct Row {
    std::string name;
    double best_cpp = 0, best_torch = 0;
  };
  std::vector<Row> rows;
  for (const Case& c : cases) {
    Row row{c.name};
    for (int threads : o.thread_counts) {
      Measured m = measure(c.cfg, threads, o.steps, o.warmup, o.profile_steps);
      const double denominator = threads == 1 ? peak1 : peak;
      const double mfu = m.tokens_per_s * m.flops_per_token / (denominator * 1e9);
      if (o.json) {
        loopmoe::bench::print_json_line({{"kind", "case"},
                                         {"device", "cpu"},
                                         {"case", c.name},
                                         {"config", c.path},
                                         {"batch", c.cfg.train.batch_size},
                                         {"seq_len", c.cfg.model.seq_len},
                                         {"threads", threads},
                                         {"precision", c.cfg.train.precision},
                                         {"steps", o.steps},
                                         {"warmup", o.warmup},
                                         {"tokens_per_s", m.tokens_per_s},
                                         {"step_ms", m.step_ms},
                                         {"flops_per_token", m.flops_per_token},
                                         {"flops_source", "measured (ops::gemm counter)"},
                                         {"mfu", mfu},
                                         {"mfu_denominator", "cpu sgemm 2048^3"},
                                         {"peak_gflops", denominator}});
      } else {
        std::printf("%-22s %7d %11.0f %9.1f %12.4f %6.1f%%\n", shown_name(c).c_str(), threads,
                    m.tokens_per_s, m.step_ms, m.flops_per_token / 1e9, 100 * mfu);
      }
      if (o.profile_steps > 0) {
        loopmoe::bench::print_profile(c.name, "cpu (" + std::to_string(threads) + " threads)",
                                      m.profile, o.json);
      }
      row.best_cpp = std::max(row.best_cpp, m.tokens_per_s);
    }
    if (!o.no_torch) {
      for (int threads : o.thread_counts) {
        loopmoe::bench::PeerRequest request;
        request.script = o.peer;
        request.config = c.path;
        request.steps = o.torch_steps;
        request.threads = threads;
        if (c.batch_overridden) request.batch = c.cfg.train.batch_size;
        const nlohmann::json result = loopmoe::bench::run_peer(request);
        const double t = loopmoe::bench::peer_tokens_per_s(result);
        if (o.json) {
          loopmoe::bench::print_json_line({{"kind", "peer"},
                                           {"case", c.name},
                                           {"threads", threads},
                                           {"ok", t > 0},
                                           {"result", result}});
        } else {
          std::printf("%-22s %7d %11.0f   (PyTorch %s)\n", row.name.c_str(), threads, t,
                      t > 0 ? "peer" : "peer FAILED");
        }
        row.best_torch = std::max(row.best_torch, t);
      }
    }
    rows.push_back(row);
  }
  if (o.json) return 0;
  std::printf(
      "\nGFLOP/token counts every matmul the engine executes in forward+backward "
      "(attention scores over the full T×T block).\n");
  for (const Row& r : rows) {
    if (r.best_torch > 0) {
      std::printf("%-22s engine best %.0f tok/s vs PyTorch best %.0f tok/s: %.2fx\n",
                  r.name.c_str(), r.best_cpp, r.best_torch, r.best_cpp / r.best_torch);
    }
  }
  return 0;
}

// --plan: the cases and their analytic budget (model/budget.h), nothing measured.
int print_plan(const std::vector<Case>& cases, bool json) {
  if (!json) {
    std::printf("%-28s %6s %6s %9s %14s %16s\n", "case", "batch", "T", "tok/step", "params",
                "GFLOP/token train");
  }
  for (const Case& c : cases) {
    const int tokens = c.cfg.train.batch_size * c.cfg.model.seq_len;
    const loopmoe::model::BudgetFigures f = loopmoe::model::budget_figures(c.cfg.model, tokens);
    if (json) {
      loopmoe::bench::print_json_line({{"kind", "plan"},
                                       {"case", c.name},
                                       {"config", c.path},
                                       {"batch", c.cfg.train.batch_size},
                                       {"seq_len", c.cfg.model.seq_len},
                                       {"total_params", f.total_params},
                                       {"flops_per_token_train", f.flops_per_token_train},
                                       {"flops_source", "analytic (model/budget.h)"}});
    } else {
      std::printf("%-28s %6d %6d %9d %14.0f %16.4f\n", c.name.c_str(), c.cfg.train.batch_size,
                  c.cfg.model.seq_len, tokens, f.total_params, f.flops_per_token_train / 1e9);
    }
  }
  if (!json)
    std::printf("(analytic figures of model/budget.h: dropless routing, full T×T scores)\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"LoopMoE training throughput vs PyTorch"};
  std::vector<std::string> configs;
  CpuOptions cpu;
  cpu.peer = std::string(LOOPMOE_SOURCE_DIR) + "/bench/torch_peer.py";
  std::string device = "cpu", python;
  std::vector<int> batches;
  std::vector<std::string> peer_variants;
  double max_seconds = 0;
  bool plan = false;
  std::string precision;
  app.add_option("--config", configs, "config(s) to measure")->required();
  app.add_option("--steps", cpu.steps, "timed steps")->capture_default_str();
  app.add_option("--warmup", cpu.warmup, "untimed steps first")->capture_default_str();
  app.add_option("--torch-steps", cpu.torch_steps, "timed steps of the PyTorch peer");
  app.add_option("--peer", cpu.peer, "PyTorch peer script");
  app.add_flag("--no-torch", cpu.no_torch, "skip the PyTorch peer");
  app.add_option("--threads", cpu.thread_counts, "thread counts to measure (cpu)")
      ->capture_default_str();
  app.add_option("--device", device,
                 "cpu, cuda or cuda:N (cuda: a build with -DLOOPMOE_CUDA=ON and a GPU)")
      ->capture_default_str();
  app.add_option("--batch", batches,
                 "sequences per step to measure each config at (default: its train.batch_size)")
      ->check(CLI::PositiveNumber);
  app.add_option("--python", python,
                 "python of the PyTorch peer (default: /usr/bin/python3 on cpu, python3 from "
                 "PATH on cuda)");
  app.add_option("--peer-variant", peer_variants,
                 "cuda: the peer's --variant(s) to run, of eager, grouped, compile (default: "
                 "eager)")
      ->check(CLI::IsMember({"eager", "grouped", "compile"}));
  app.add_option("--max-seconds", max_seconds,
                 "cuda: stop a case's timed steps once they took this long (at least one step; "
                 "0: no limit)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--precision", precision,
                 "fp32 or bf16: every case's train.precision (default: each config's own)")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  app.add_option("--profile", cpu.profile_steps,
                 "after each case's timed steps, this many more with the op profile on: time "
                 "per ops.h function (on CUDA with a synchronisation after each op), printed "
                 "under the case (0: none)")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--json", cpu.json, "print one JSON object per line instead of the tables");
  app.add_flag("--plan", plan,
               "print the cases with their analytic parameters and FLOPs; measure nothing");
  CLI11_PARSE(app, argc, argv);

  return loopmoe::common::run_main([&]() -> int {
    // First, so that a --device that cannot work fails in one line before anything is measured.
    const loopmoe::model::Device dev = loopmoe::model::use_device(device);
    std::vector<Case> cases = loopmoe::bench::make_cases(configs, batches);
    if (!precision.empty()) {
      for (Case& c : cases) c.cfg.train.precision = precision;
    }
    if (plan) return print_plan(cases, cpu.json);
    if (dev == loopmoe::model::Device::kCpu) {
      if (!peer_variants.empty() || max_seconds > 0 || !python.empty()) {
        throw std::runtime_error(
            "--peer-variant, --max-seconds and --python are for --device cuda; the cpu "
            "benchmark runs the peer as before");
      }
      return run_cpu(cases, cpu);
    }
    if (dev != loopmoe::model::Device::kCuda) {
      throw std::runtime_error("--device " + device + ": loopmoe_bench measures cpu or cuda");
    }
#if defined(LOOPMOE_HAVE_CUDA)
    loopmoe::bench::GpuOptions g;
    g.device = device;
    g.steps = cpu.steps;
    g.warmup = cpu.warmup;
    g.torch_steps = cpu.torch_steps;
    g.max_seconds = max_seconds;
    g.peer = cpu.peer;
    g.python = python.empty() ? "python3" : python;
    g.peer_variants = peer_variants.empty() ? std::vector<std::string>{"eager"} : peer_variants;
    g.no_torch = cpu.no_torch;
    g.json = cpu.json;
    g.profile_steps = cpu.profile_steps;
    return loopmoe::bench::run_gpu(cases, g);
#else
    // use_device("cuda") already refused: a build without the CUDA backend has no device.
    throw std::runtime_error("--device " + device + ": this loopmoe_bench has no CUDA support");
#endif
  });
}
