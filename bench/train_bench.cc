// Training throughput and model-FLOPs utilisation of the engine on a config, at 1 and 2 threads,
// against the sgemm rate measured in the same run and the PyTorch peer (bench/torch_peer.py) on
// the identical config. Random tokens: the data pipeline is not what is measured here.
#include <cblas.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "common/clock.h"
#include "model/config.h"
#include "model/cpu/sgemm.h"
#include "model/model.h"
#include "model/ops.h"
#include "model/optimizer.h"
#include "model/rng.h"

namespace {

using Clock = std::chrono::steady_clock;

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
};

Measured measure(const loopmoe::model::Config& cfg, int threads, int steps, int warmup) {
  loopmoe::model::set_num_threads(threads);
  loopmoe::model::Model model(cfg.model);
  model.set_grad_groups(cfg.train.grad_groups);
  model.init_params(cfg.train.seed);
  loopmoe::model::AdamW adam(model.layout(), cfg.train);
  const int B = cfg.train.batch_size, T = cfg.model.seq_len;
  std::vector<int32_t> in(static_cast<size_t>(B) * T), tg(in.size());
  loopmoe::model::Rng rng(1);
  Measured m;
  double total = 0;
  for (int s = 0; s < warmup + steps; ++s) {
    for (size_t i = 0; i < in.size(); ++i) {
      in[i] = static_cast<int32_t>(rng.next_u64() % cfg.model.vocab_size);
      tg[i] = static_cast<int32_t>(rng.next_u64() % cfg.model.vocab_size);
    }
    loopmoe::model::ops::reset_gemm_flops();
    auto t0 = Clock::now();
    model.zero_grad();
    model.forward(in.data(), tg.data(), B, T);
    model.backward();
    loopmoe::model::clip_grad_norm(model.grads(), model.num_params(), cfg.train.grad_clip);
    adam.step(model.params(), model.grads(), 1e-3);
    const double dt = loopmoe::common::seconds_since(t0);
    if (s >= warmup) total += dt;
    m.flops_per_token = static_cast<double>(loopmoe::model::ops::gemm_flops()) / (B * T);
  }
  m.step_ms = 1e3 * total / steps;
  m.tokens_per_s = static_cast<double>(B) * T * steps / total;
  return m;
}

// Runs the PyTorch peer; returns tokens/s or 0 when it cannot run.
double torch_tokens_per_s(const std::string& script, const std::string& config, int threads,
                          int steps) {
  std::ostringstream cmd;
  cmd << "/usr/bin/python3 " << script << " --config " << config << " --steps " << steps
      << " --threads " << threads << " --json 2>/dev/null";
  FILE* p = popen(cmd.str().c_str(), "r");
  if (p == nullptr) return 0;
  std::string out;
  char buf[512];
  while (fgets(buf, sizeof buf, p) != nullptr) out += buf;
  pclose(p);
  const auto pos = out.find("\"tokens_per_s\"");
  if (pos == std::string::npos) return 0;
  return std::stod(out.substr(out.find(':', pos) + 1));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"LoopMoE training throughput vs PyTorch"};
  std::vector<std::string> configs;
  int steps = 10, warmup = 2, torch_steps = 10;
  std::string peer = std::string(LOOPMOE_SOURCE_DIR) + "/bench/torch_peer.py";
  bool no_torch = false;
  std::vector<int> thread_counts = {1, 2};
  app.add_option("--config", configs, "config(s) to measure")->required();
  app.add_option("--steps", steps, "timed steps")->capture_default_str();
  app.add_option("--warmup", warmup, "untimed steps first")->capture_default_str();
  app.add_option("--torch-steps", torch_steps, "timed steps of the PyTorch peer");
  app.add_option("--peer", peer, "PyTorch peer script");
  app.add_flag("--no-torch", no_torch, "skip the PyTorch peer");
  app.add_option("--threads", thread_counts, "thread counts to measure")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  const Peak p1 = sgemm_gflops(1), p2 = sgemm_gflops(2);
  const double peak1 = p1.best(), peak = std::max(peak1, p2.best());
  std::printf(
      "sgemm 2048^3, GFLOP/s: engine (model/cpu/sgemm, %s) %.1f with 1 thread, %.1f with 2;\n"
      "OpenBLAS (%s) %.1f with 1 thread, %.1f with 2. MFU denominators for 1 and 2 threads: the\n"
      "better of the two at the same thread count (%.1f, %.1f)\n\n",
      loopmoe::model::ops::cpu::sgemm_kernel_name(), p1.engine, p2.engine, openblas_get_corename(),
      p1.openblas, p2.openblas, peak1, peak);
  std::printf("%-22s %7s %11s %9s %12s %7s\n", "config", "threads", "tokens/s", "step ms",
              "GFLOP/token", "MFU");
  struct Row {
    std::string name;
    double best_cpp = 0, best_torch = 0;
  };
  std::vector<Row> rows;
  for (const std::string& path : configs) {
    loopmoe::model::Config cfg = loopmoe::model::load_config(path);
    Row row{path.substr(path.find_last_of('/') + 1)};
    for (int threads : thread_counts) {
      Measured m = measure(cfg, threads, steps, warmup);
      const double mfu = m.tokens_per_s * m.flops_per_token / ((threads == 1 ? peak1 : peak) * 1e9);
      std::printf("%-22s %7d %11.0f %9.1f %12.4f %6.1f%%\n", row.name.c_str(), threads,
                  m.tokens_per_s, m.step_ms, m.flops_per_token / 1e9, 100 * mfu);
      row.best_cpp = std::max(row.best_cpp, m.tokens_per_s);
    }
    if (!no_torch) {
      for (int threads : thread_counts) {
        const double t = torch_tokens_per_s(peer, path, threads, torch_steps);
        std::printf("%-22s %7d %11.0f   (PyTorch %s)\n", row.name.c_str(), threads, t,
                    t > 0 ? "peer" : "peer FAILED");
        row.best_torch = std::max(row.best_torch, t);
      }
    }
    rows.push_back(row);
  }
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
