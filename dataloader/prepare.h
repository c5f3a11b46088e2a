// `data prepare`: text files -> tokenizer + train/val token shards + meta.json.
#pragma once

#include <cstdint>
#include <filesystem>
#include <iosfwd>
#include <string>
#include <vector>

#include "dataloader/token_shard.h"

namespace loopmoe::data {

struct PrepareOptions {
  // Files, or directories whose *.txt files are taken (not recursive). The union is sorted by
  // path, so the order given does not matter.
  std::vector<std::filesystem::path> inputs;
  std::filesystem::path out_dir;
  int vocab_size = 0;                     // required unless tokenizer_model is set
  std::filesystem::path tokenizer_model;  // empty: train a BPE model on the train split
  double val_fraction = 0.05;             // in (0, 1)
  uint64_t seed = 1234;
  bool docs_per_line = false;   // each non-blank line is a document instead of each file
  std::ostream* log = nullptr;  // progress lines; nullptr is quiet
};

struct PrepareResult {
  uint32_t vocab_size = 0;
  uint64_t num_files = 0;
  uint64_t input_bytes = 0;
  uint64_t train_docs = 0, train_tokens = 0;
  uint64_t val_docs = 0, val_tokens = 0;
  double tokenizer_seconds = 0;  // training or loading
  double encode_seconds = 0;
  double total_seconds = 0;
};

// Writes out_dir/{tokenizer.model, train.bin, val.bin, meta.json}; each file atomically. The
// same inputs, options and seed give byte-identical files. Throws DataError on bad input.
PrepareResult prepare_dataset(const PrepareOptions& options);

// Whether document `doc_index` of the file named `file_name` (its base name) goes to validation:
// XXH64 of "<file_name>#<doc_index>" with `seed`, scaled to [0, 1), below val_fraction. It looks
// at nothing else, so adding or removing other files never moves a document across the split.
bool is_validation_doc(const std::string& file_name, uint64_t doc_index, uint64_t seed,
                       double val_fraction);

// A prepared dataset directory, opened and validated.
struct Dataset {
  TokenShard train;
  TokenShard val;
};
Dataset open_dataset(const std::filesystem::path& dir);

}  // namespace loopmoe::data
