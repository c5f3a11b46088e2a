// A tiny LoopMoE config and a synthetic corpus with structure to learn, for end-to-end tests.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "dataloader/token_shard.h"
#include "model/config.h"
#include "model/rng.h"

namespace loopmoe::testing {

// Writes train.bin and val.bin under dir: 80% a period-17 pattern, 20% noise, vocabulary 60.
inline void write_pattern_corpus(const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir);
  model::Rng rng(5);
  for (const char* split : {"train", "val"}) {
    std::vector<int32_t> tokens(4000);
    for (size_t i = 0; i < tokens.size(); ++i) {
      tokens[i] = rng.uniform() < 0.8 ? static_cast<int32_t>(i % 17)
                                      : static_cast<int32_t>(rng.next_u64() % 60);
    }
    std::vector<uint64_t> docs = {0, 2000, tokens.size()};
    dataloader::write_token_shard(dir / (std::string(split) + ".bin"), 60, tokens, docs);
  }
}

// Writes train.bin and val.bin under dir with text-like statistics: a Zipfian unigram
// distribution over `vocab` ids, and each id followed half the time by one of its 8 preferred
// successors (Zipfian among them). Large enough not to be memorised in a short run, so loss falls
// gradually, as on real text; `tokens` per split.
inline void write_zipf_markov_corpus(const std::filesystem::path& dir, int vocab, size_t tokens) {
  std::filesystem::create_directories(dir);
  model::Rng rng(11);
  std::vector<double> cdf(vocab);
  double total = 0;
  for (int i = 0; i < vocab; ++i) cdf[i] = (total += 1.0 / (i + 1));
  auto zipf = [&] {
    const double u = rng.uniform() * total;
    return static_cast<int32_t>(std::lower_bound(cdf.begin(), cdf.end(), u) - cdf.begin());
  };
  std::vector<int32_t> successor(static_cast<size_t>(vocab) * 8);
  for (int32_t& s : successor) s = zipf();
  for (const char* split : {"train", "val"}) {
    std::vector<int32_t> t(tokens);
    t[0] = zipf();
    for (size_t i = 1; i < tokens; ++i) {
      if (rng.uniform() < 0.5) {
        const int j = std::min(7, static_cast<int>(-std::log2(1.0 - rng.uniform() * 0.996)));
        t[i] = successor[static_cast<size_t>(t[i - 1]) * 8 + j];
      } else {
        t[i] = zipf();
      }
    }
    std::vector<uint64_t> docs = {0, tokens / 2, tokens};
    dataloader::write_token_shard(dir / (std::string(split) + ".bin"), vocab, t, docs);
  }
}

inline model::Config tiny_loopmoe_config(const std::filesystem::path& data_dir) {
  model::Config c;
  c.model.vocab_size = 64;
  c.model.seq_len = 16;
  c.model.d_model = 16;
  c.model.n_heads = 2;
  c.model.head_dim = 8;
  c.model.n_layers = 2;
  c.model.n_loops = 2;
  c.model.n_experts = 4;
  c.model.expert_hidden = 16;
  c.model.iter_adaln = model::IterAdaLNMode::kJoint;
  c.model.cond_dim = 4;
  c.model.capacity_factor = 1.25;
  c.train.batch_size = 4;
  c.train.steps = 12;
  c.train.warmup_steps = 2;
  c.train.eval_interval = 5;
  c.train.eval_batches = 2;
  c.train.checkpoint_interval = 4;
  c.train.log_interval = 1;
  c.data.dir = data_dir.string();
  return c;
}

// A fresh directory under the system temp dir, named after the running test.
inline std::filesystem::path fresh_test_dir(const std::string& prefix, const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() /
             (prefix + "_" + std::to_string(::getpid()) + "_" + name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

}  // namespace loopmoe::testing
