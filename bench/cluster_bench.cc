// Step time of W workers + S expert shards (each a thread of this process with its own Gloo
// communicators over loopback TCP, one OpenMP thread each) against the single-process trainer on
// the same config and global batch, plus the all-to-all traffic per step. Uniform random tokens:
// the data pipeline is not what is measured. The target: cluster ≤ 1.3× the single
// process's step time.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <thread>
#include <vector>

#include "comm/in_process_store.h"
#include "common/clock.h"
#include "dataloader/sampler.h"
#include "dataloader/token_shard.h"
#include "model/config.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "model/rng.h"
#include "runtime/create_runtime.h"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

void write_random_corpus(const fs::path& dir, int vocab) {
  fs::create_directories(dir);
  loopmoe::model::Rng rng(9);
  std::vector<int32_t> tokens(1 << 20);
  for (int32_t& t : tokens) t = static_cast<int32_t>(rng.next_u64() % vocab);
  const std::vector<uint64_t> docs = {0, tokens.size()};
  for (const char* split : {"train", "val"}) {
    loopmoe::dataloader::write_token_shard(dir / (std::string(split) + ".bin"), vocab, tokens,
                                           docs);
  }
}

// Mean step time of the single-process training step (sample, forward, backward, clip, AdamW).
double single_process_ms(const loopmoe::model::Config& cfg, int threads, int steps, int warmup) {
  loopmoe::model::set_num_threads(threads);
  const auto shard = loopmoe::dataloader::TokenShard::open(fs::path(cfg.data.dir) / "train.bin");
  loopmoe::model::Model model(cfg.model);
  model.set_grad_groups(cfg.train.grad_groups);
  model.init_params(cfg.train.seed);
  loopmoe::model::AdamW adam(model.layout(), cfg.train);
  const int B = cfg.train.batch_size, T = cfg.model.seq_len;
  loopmoe::dataloader::BatchSampler sampler(shard, B, T, cfg.train.seed, true);
  std::vector<int32_t> in(static_cast<size_t>(B) * T), tg(in.size());
  double total = 0;
  for (int s = 0; s < warmup + steps; ++s) {
    const auto t0 = Clock::now();
    sampler.next(in.data(), tg.data());
    model.zero_grad();
    model.forward(in.data(), tg.data(), B, T);
    model.backward();
    loopmoe::model::clip_grad_norm(model.grads(), model.num_params(), cfg.train.grad_clip);
    adam.step(model.params(), model.grads(), loopmoe::model::learning_rate(cfg.train, s));
    if (s >= warmup) total += loopmoe::common::seconds_since(t0);
  }
  return 1e3 * total / steps;
}

struct ClusterResult {
  double step_ms = 0;  // worker 0's wall time per step (every step is lock-step)
  double worker_a2a_mb = 0, worker_a2a_ms = 0, shard_a2a_mb = 0, shard_a2a_ms = 0;
};

ClusterResult cluster(const loopmoe::model::Config& cfg, int W, int S, int steps, int warmup) {
  loopmoe::comm::InProcessStore store;
  loopmoe::comm::NamespacedStore ns(store, "bench", 0);
  std::vector<std::vector<loopmoe::runtime::StepReport>> reports(W + S);
  std::vector<std::thread> threads;
  std::vector<std::string> errors(W + S);
  for (int i = 0; i < W + S; ++i) {
    threads.emplace_back([&, i] {
      try {
        loopmoe::runtime::ProcessSetup s;
        s.job_id = "bench";
        s.role = i < W ? loopmoe::runtime::Role::kWorker : loopmoe::runtime::Role::kExpertShard;
        s.rank = i < W ? i : i - W;
        s.num_workers = W;
        s.num_shards = S;
        s.config_toml = loopmoe::model::to_toml(cfg);
        s.store = &ns;
        auto rt = loopmoe::runtime::create_runtime(s);
        for (int k = 0; k < warmup + steps; ++k) {
          auto r = rt->step(cfg.model.n_loops);
          if (k >= warmup) reports[i].push_back(std::move(r));
        }
      } catch (const std::exception& e) {
        errors[i] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const std::string& e : errors) {
    if (!e.empty()) throw std::runtime_error(e);
  }
  ClusterResult r;
  for (const auto& s : reports[0]) {
    r.step_ms += 1e3 * s.seconds / steps;
    r.worker_a2a_mb += s.alltoall_bytes / 1e6 / steps;
    r.worker_a2a_ms += 1e3 * s.alltoall_seconds / steps;
  }
  for (const auto& s : reports[W]) {
    r.shard_a2a_mb += s.alltoall_bytes / 1e6 / steps;
    r.shard_a2a_ms += 1e3 * s.alltoall_seconds / steps;
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"LoopMoE: distributed step time (W workers + S shards) vs one process"};
  std::vector<std::string> configs;
  int workers = 2, shards = 2, steps = 10, warmup = 2;
  app.add_option("--config", configs, "config(s) to measure")->required();
  app.add_option("--workers", workers, "workers")->capture_default_str();
  app.add_option("--shards", shards, "expert shards")->capture_default_str();
  app.add_option("--steps", steps, "timed steps")->capture_default_str();
  app.add_option("--warmup", warmup, "untimed steps first")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  const fs::path data =
      fs::temp_directory_path() / ("loopmoe_cluster_bench_" + std::to_string(::getpid()));
  std::printf("%-20s %-22s %9s %10s %8s %14s %14s\n", "config", "run", "step ms", "tokens/s",
              "vs 1p", "a2a MB/step", "a2a ms/step");
  for (const std::string& path : configs) {
    loopmoe::model::Config cfg = loopmoe::model::load_config(path);
    write_random_corpus(data, cfg.model.vocab_size);
    cfg.data.dir = data.string();
    const std::string name = path.substr(path.find_last_of('/') + 1);
    const double tokens = static_cast<double>(cfg.train.batch_size) * cfg.model.seq_len;
    const double one = single_process_ms(cfg, 1, steps, warmup);
    const double two = single_process_ms(cfg, 2, steps, warmup);
    std::printf("%-20s %-22s %9.1f %10.0f %8s %14s %14s\n", name.c_str(), "1 process, 1 thread",
                one, tokens / one * 1e3, "1.00x", "-", "-");
    std::printf("%-20s %-22s %9.1f %10.0f %7.2fx %14s %14s\n", name.c_str(), "1 process, 2 threads",
                two, tokens / two * 1e3, two / one, "-", "-");
    const ClusterResult c = cluster(cfg, workers, shards, steps, warmup);
    const std::string run =
        std::to_string(workers) + " workers + " + std::to_string(shards) + " shards";
    std::printf("%-20s %-22s %9.1f %10.0f %7.2fx %6.2f / %5.2f %6.1f / %5.1f\n", name.c_str(),
                run.c_str(), c.step_ms, tokens / c.step_ms * 1e3, c.step_ms / one, c.worker_a2a_mb,
                c.shard_a2a_mb, c.worker_a2a_ms, c.shard_a2a_ms);
  }
  std::printf(
      "\nvs 1p: step time relative to one process with one thread (target for the cluster: "
      "<= 1.3x).\na2a: bytes sent and seconds spent in all-to-all per step, worker 0 / shard 0 "
      "(headers included; a shard's seconds include waiting for the workers' attention).\n"
      "Every process of the cluster runs one OpenMP thread; the machine's cores are shared.\n");
  fs::remove_all(data);
  return 0;
}
