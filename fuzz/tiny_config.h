// The smallest real model, for the checkpoint seeds (make_seeds.cc) and the checkpoint fuzzer,
// which loads into it: a few hundred parameters, so a checkpoint is a few KB.
#pragma once

#include "model/config.h"

namespace loopmoe::fuzz {

inline model::Config tiny_config() {
  model::Config c;
  model::ModelConfig& m = c.model;
  m.vocab_size = 8;
  m.seq_len = 4;
  m.d_model = 4;
  m.n_heads = 1;
  m.head_dim = 2;
  m.n_layers = 1;
  m.n_loops = 2;
  m.n_experts = 2;
  m.top_k = 1;
  m.expert_hidden = 2;
  m.iter_adaln = model::IterAdaLNMode::kIter;
  m.cond_dim = 2;
  c.train.steps = 10;
  c.train.warmup_steps = 2;
  c.data.dir = "/fuzz/data";
  return c;
}

}  // namespace loopmoe::fuzz
