// Evaluation of a trained run: held-out perplexity, cloze and multiple-choice tasks, logit lens,
// other loop counts at inference, adaptive halting.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace loopmoe::eval {

struct EvalOptions {
  std::vector<int> loops;               // loop counts to evaluate besides the trained one
  std::vector<double> halt_thresholds;  // adaptive-halting thresholds (LoopMoE only)
  int batches = 16;                     // validation batches for perplexity and sweeps
  int max_items = 400;                  // per task
  int threads = 1;
  std::string data_dir;       // dataset directory; empty: the checkpoint's data.dir (docs/EVAL.md)
  uint64_t task_seed = 1234;  // seed of the hashes that select task items and distractors
  bool progress = false;      // progress lines on stderr
};

// Reads RUN/checkpoint.bin, its config and the dataset's tokenizer, writes RUN/eval.json and
// returns its text. Schema: docs/EVAL.md.
std::string run_eval(const std::string& run_dir, const EvalOptions& options);

}  // namespace loopmoe::eval
