// Writes the parity dump of docs/MODEL.md: perturbed weights, a batch, logits, loss parts,
// gradients and the losses of K AdamW steps, for tests/reference/check_parity.py to recompute.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <fstream>
#include <iostream>

#include "model/config.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "model/rng.h"

namespace {

void write_raw(const std::string& path, const void* data, size_t bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  if (!out) throw std::runtime_error("cannot write " + path);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Dump a LoopMoE model, batch, logits, gradients and AdamW losses for the oracle"};
  std::string config_path, out_dir, mode;
  int batch = 2, seq_len = 16, steps = 10, threads = 1;
  uint64_t seed = 7;
  double capacity = -1;
  app.add_option("--config", config_path, "model config (TOML)")->required();
  app.add_option("--out", out_dir, "output directory (must exist)")->required();
  app.add_option("--batch", batch, "batch size");
  app.add_option("--seq-len", seq_len, "sequence length");
  app.add_option("--steps", steps, "AdamW steps whose losses are recorded");
  app.add_option("--seed", seed, "seed of weights, perturbation and batch");
  app.add_option("--iter-adaln", mode, "override model.iter_adaln");
  app.add_option("--capacity-factor", capacity, "override model.capacity_factor");
  app.add_option("--threads", threads, "OpenMP threads");
  CLI11_PARSE(app, argc, argv);
  try {
    loopmoe::model::Config cfg = loopmoe::model::load_config(config_path);
    if (!mode.empty()) cfg.model.iter_adaln = loopmoe::model::parse_iter_adaln_mode(mode);
    if (capacity >= 0) cfg.model.capacity_factor = capacity;
    cfg.model.seq_len = seq_len;
    cfg.train.batch_size = batch;
    cfg.train.steps = steps;
    cfg.train.warmup_steps = std::min(cfg.train.warmup_steps, 3);
    loopmoe::model::validate(cfg);
    loopmoe::model::set_num_threads(threads);
    loopmoe::model::Model model(cfg.model);
    model.set_grad_groups(cfg.train.grad_groups);  // the oracle checks the grouped reduction too
    model.set_keep_logits(true);                   // logits.bin is read after the backward
    model.init_params(seed);
    // Perturb every tensor so every path (IterAdaLN modulation included) carries gradient.
    loopmoe::model::Rng rng(seed ^ 0xA5A5A5A5ull);
    for (size_t i = 0; i < model.num_params(); ++i) {
      model.params()[i] += static_cast<float>(0.05 * rng.normal());
    }
    const int S = batch * seq_len;
    std::vector<int32_t> tokens(static_cast<size_t>(batch) * (seq_len + 1));
    for (auto& t : tokens) t = static_cast<int32_t>(rng.next_u64() % cfg.model.vocab_size);
    std::vector<int32_t> in(S), tg(S);
    for (int b = 0; b < batch; ++b) {
      for (int t = 0; t < seq_len; ++t) {
        in[b * seq_len + t] = tokens[b * (seq_len + 1) + t];
        tg[b * seq_len + t] = tokens[b * (seq_len + 1) + t + 1];
      }
    }
    const std::string d = out_dir + "/";
    write_raw(d + "params.bin", model.params(), model.num_params() * sizeof(float));
    write_raw(d + "tokens.bin", tokens.data(), tokens.size() * sizeof(int32_t));
    model.zero_grad();
    loopmoe::model::LossParts loss = model.forward(in.data(), tg.data(), batch, seq_len);
    model.backward();
    const std::vector<float> logits = model.logits_to_host();
    write_raw(d + "logits.bin", logits.data(), logits.size() * sizeof(float));
    write_raw(d + "grads.bin", model.grads(), model.num_params() * sizeof(float));

    std::vector<double> train_losses;
    loopmoe::model::AdamW opt(model.layout(), cfg.train);
    for (int s = 0; s < steps; ++s) {
      model.zero_grad();
      train_losses.push_back(model.forward(in.data(), tg.data(), batch, seq_len).total);
      model.backward();
      loopmoe::model::clip_grad_norm(model.grads(), model.num_params(), cfg.train.grad_clip);
      opt.step(model.params(), model.grads(), loopmoe::model::learning_rate(cfg.train, s));
    }

    std::ofstream m(d + "manifest.json");
    m << "{\"model\": " << loopmoe::model::model_to_json(cfg.model)
      << ", \"train\": " << loopmoe::model::train_to_json(cfg.train) << ", \"batch\": " << batch
      << ", \"seq_len\": " << seq_len << ", \"adam_steps\": " << steps
      << ", \"num_params\": " << model.num_params() << ", \"params\": [";
    bool first = true;
    for (const auto& t : model.layout().tensors()) {
      m << (first ? "" : ", ") << "{\"name\": \"" << t.name << "\", \"offset\": " << t.offset
        << ", \"shape\": [";
      for (size_t i = 0; i < t.shape.size(); ++i) m << (i ? ", " : "") << t.shape[i];
      m << "]}";
      first = false;
    }
    m << "]}\n";
    std::ofstream o(d + "outputs.json");
    o.precision(17);
    o << "{\"loss\": " << loss.total << ", \"ce\": " << loss.ce << ", \"aux\": " << loss.aux
      << ", \"z\": " << loss.z << ", \"dropped\": " << loss.dropped << ", \"train_losses\": [";
    for (size_t i = 0; i < train_losses.size(); ++i) o << (i ? ", " : "") << train_losses[i];
    o << "]}\n";
    std::printf("wrote %s (%zu params, loss %.6f)\n", out_dir.c_str(), model.num_params(),
                loss.total);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
