#include "eval/evaluator.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>

#include "common/atomic_file.h"
#include "common/clock.h"
#include "dataloader/dataset_check.h"
#include "dataloader/sampler.h"
#include "dataloader/token_shard.h"
#include "dataloader/tokenizer.h"
#include "eval/domain_loss.h"
#include "eval/eval_tasks.h"
#include "model/error.h"
#include "model/model.h"
#include "train/checkpoint.h"

namespace loopmoe::eval {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

// Thresholds on the relative change ‖x_r − x_{r−1}‖ / ‖x_{r−1}‖ of a token's residual stream.
// The first iteration changes the embedding by far more than 100%, so a token can only halt
// after its second one; on the demo run these span from almost no halting to about half of the
// iterations.
const std::vector<double> kDefaultThresholds = {0.02, 0.05, 0.1, 0.2, 0.5};

std::string run_name(const fs::path& run_dir) {
  fs::path p = run_dir.lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  const std::string name = p.filename().string();
  return name.empty() || name == "." ? fs::absolute(p).lexically_normal().filename().string()
                                     : name;
}

// Every loss-based figure, from the same validation batches.
struct LossFigures {
  double val_loss = 0;
  int64_t val_tokens = 0;
  std::vector<double> lens;                           // per iteration r
  std::vector<std::pair<int, double>> sweep;          // loops → loss
  std::vector<double> adaptive_loss, adaptive_iters;  // per threshold
};

LossFigures loss_figures(model::Model& model, const dataloader::TokenShard& val, int B, int T,
                         int batches, const std::vector<int>& sweep,
                         const std::vector<double>& thresholds,
                         const std::function<void(size_t, size_t)>& progress) {
  const int R = model.config().n_loops, S = B * T;
  dataloader::BatchSampler sampler(val, B, T, 0, dataloader::WindowOrder::kSpread);
  LossFigures f;
  f.lens.assign(R, 0);
  std::vector<double> sweep_total(sweep.size(), 0);
  f.adaptive_loss.assign(thresholds.size(), 0);
  f.adaptive_iters.assign(thresholds.size(), 0);
  std::vector<int32_t> in(static_cast<size_t>(S)), tg(in.size());
  double total = 0;
  for (int i = 0; i < batches; ++i) {
    sampler.next(in.data(), tg.data());
    // Accumulated exactly as trainer.cc's validation_loss does, so the two agree to the bit.
    total += model.forward(in.data(), tg.data(), B, T).ce;
    for (int r = 0; r < R; ++r) {
      f.lens[r] += model.decode_loss(model.iteration_state(r), tg.data(), S);
    }
    for (size_t k = 0; k < sweep.size(); ++k) {
      // Up to R loops, the output is the logit lens of that iteration: the same computation.
      if (sweep[k] <= R) continue;
      sweep_total[k] += model.forward(in.data(), tg.data(), B, T, sweep[k]).ce;
    }
    for (size_t k = 0; k < thresholds.size(); ++k) {
      model::ForwardOptions fo;
      fo.halt_threshold = thresholds[k];
      f.adaptive_loss[k] += model.forward(in.data(), tg.data(), B, T, fo).ce;
      int64_t iterations = 0;
      for (int used : model.iterations_used()) iterations += used;
      f.adaptive_iters[k] += static_cast<double>(iterations) / S;
    }
    if (progress) progress(i + 1, batches);
  }
  f.val_loss = total / batches;
  f.val_tokens = static_cast<int64_t>(batches) * S;
  for (double& l : f.lens) l /= batches;
  for (size_t k = 0; k < sweep.size(); ++k) {
    const int loops = sweep[k];
    f.sweep.push_back({loops, loops == R  ? f.val_loss
                              : loops < R ? f.lens[loops - 1]
                                          : sweep_total[k] / batches});
  }
  for (size_t k = 0; k < thresholds.size(); ++k) {
    f.adaptive_loss[k] /= batches;
    f.adaptive_iters[k] /= batches;
  }
  return f;
}

}  // namespace

std::string run_eval(const std::string& run_dir, const EvalOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  const fs::path run(run_dir);
  const fs::path ckpt = run / "checkpoint.bin";
  model::Config cfg;
  const std::unique_ptr<model::Model> loaded = train::load_model(ckpt.string(), &cfg);
  model::Model& model = *loaded;
  const int B = cfg.train.batch_size, T = cfg.model.seq_len, R = cfg.model.n_loops;
  const bool looped = R > 1;

  std::set<int> loops = {R};
  if (options.loops.empty() && looped) {
    for (int k = 1; k <= 2 * R; ++k) loops.insert(k);
  }
  for (int k : options.loops) {
    if (k < 1)
      throw model::ConfigError("eval: --loops " + std::to_string(k) + " must be at least 1");
    loops.insert(k);
  }
  std::vector<double> thresholds;
  if (looped) {
    thresholds = options.halt_thresholds.empty() ? kDefaultThresholds : options.halt_thresholds;
  }
  for (double t : thresholds) {
    if (!(t > 0))
      throw model::ConfigError("eval: halt threshold " + std::to_string(t) + " must be > 0");
  }
  if (!looped && !options.halt_thresholds.empty() && options.progress) {
    std::fprintf(stderr, "note: %s has n_loops = 1; adaptive halting does not apply\n",
                 run_dir.c_str());
  }
  if (options.batches < 1) throw model::ConfigError("eval: --batches must be at least 1");
  if (options.max_items < 0) throw model::ConfigError("eval: --max-items must not be negative");

  model::set_num_threads(options.threads);
  const fs::path data_dir = resolve_data_dir(cfg, run, options.data_dir);
  // The trainer's check of the shard against the model (docs/DATA.md "Checking a dataset before
  // a run"), of the validation shard only: eval reads no training data.
  dataloader::DatasetNeeds needs;
  needs.max_vocab = static_cast<uint32_t>(cfg.model.vocab_size);
  needs.seq_len = T;
  dataloader::check_validation_shard(data_dir, needs);
  const dataloader::TokenShard val = dataloader::TokenShard::open(data_dir / "val.bin");
  const dataloader::Tokenizer tokenizer = dataloader::Tokenizer::load(data_dir / "tokenizer.model");
  // Per-domain figures when the dataset holds at least two domains (docs/EVAL.md); a malformed
  // meta.json fails here, before any work.
  std::vector<ValDomain> domains = read_val_domains(data_dir / "meta.json", val.num_tokens());
  if (domains.size() < 2) domains.clear();
  if (options.progress) {
    std::fprintf(stderr, "eval %s: %s, data %s (%lu validation tokens)\n", run_dir.c_str(),
                 looped ? "looped" : "not looped", data_dir.c_str(),
                 static_cast<unsigned long>(val.num_tokens()));
  }

  // Sequential validation windows; never more batches than the shard holds, so no window counts
  // twice.
  dataloader::BatchSampler probe(val, B, T, 0, dataloader::WindowOrder::kSpread);
  const int available = static_cast<int>(std::max<uint64_t>(1, probe.windows_per_epoch() / B));
  const int batches = std::min(options.batches, available);
  const LossFigures f =
      loss_figures(model, val, B, T, batches, std::vector<int>(loops.begin(), loops.end()),
                   thresholds, progress_printer("validation batches", options.progress));
  const std::vector<DomainLoss> per_domain =
      domain_losses(model, val, domains, B, T, batches,
                    progress_printer("domain batches", options.progress && !domains.empty()));

  TaskOptions task_options;
  task_options.seq_len = T;
  task_options.max_items = options.max_items;
  task_options.seed = options.task_seed;
  const EvalTasks tasks = build_eval_tasks(held_out_texts(val, tokenizer), tokenizer, task_options);
  const ClozeResult cloze = score_cloze(model, tasks.cloze, B, T, options.progress);
  const ChoiceResult mc =
      score_multiple_choice(model, tasks.multiple_choice, B, T, options.progress);

  Json j;
  j["run"] = run_name(run);
  j["val_loss"] = f.val_loss;
  j["perplexity"] = std::exp(f.val_loss);
  j["val_tokens"] = f.val_tokens;
  if (!per_domain.empty()) {
    j["domains"] = Json::array();
    for (const DomainLoss& d : per_domain) {
      const bool scored = d.windows > 0;
      j["domains"].push_back(Json{{"name", d.name},
                                  {"val_loss", scored ? Json(d.val_loss) : Json()},
                                  {"perplexity", scored ? Json(std::exp(d.val_loss)) : Json()},
                                  {"tokens", d.tokens},
                                  {"windows", d.windows},
                                  {"val_tokens", d.val_tokens}});
    }
  }
  j["cloze"] = Json{
      {"items", cloze.items}, {"accuracy", cloze.accuracy}, {"target_loss", cloze.target_loss}};
  j["multiple_choice"] =
      Json{{"items", mc.items}, {"accuracy", mc.accuracy}, {"accuracy_norm", mc.accuracy_norm}};
  j["logit_lens"] = Json::array();
  for (int r = 0; r < R; ++r) {
    j["logit_lens"].push_back(Json{{"iteration", r}, {"loss", f.lens[r]}});
  }
  j["loop_sweep"] = Json::array();
  for (const auto& [k, loss] : f.sweep) {
    j["loop_sweep"].push_back(Json{{"loops", k}, {"loss", loss}});
  }
  j["adaptive"] = Json::array();
  for (size_t k = 0; k < thresholds.size(); ++k) {
    j["adaptive"].push_back(Json{{"threshold", thresholds[k]},
                                 {"loss", f.adaptive_loss[k]},
                                 {"avg_iterations", f.adaptive_iters[k]}});
  }
  const std::string text = j.dump(2) + "\n";

  // Written whole and renamed, so a reader never sees half a file.
  const fs::path out = run / "eval.json";
  common::write_file_atomically(out, text, [](const common::WriteFailure& f) {
    if (f.step == common::WriteStep::kCreate || f.step == common::WriteStep::kWrite) {
      throw std::runtime_error(f.tmp.string() + ": write failed");
    }
    throw std::runtime_error(f.message());
  });
  if (options.progress) {
    std::fprintf(stderr, "wrote %s in %.1f s\n", out.c_str(), common::seconds_since(t0));
  }
  return text;
}

}  // namespace loopmoe::eval
