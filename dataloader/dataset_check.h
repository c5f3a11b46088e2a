// Vetting a prepared dataset directory before a run commits to it (docs/DATA.md "Checking a
// dataset before a run").
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include "dataloader/token_shard.h"

namespace loopmoe::dataloader {

// What a run will read from a dataset directory.
struct DatasetNeeds {
  uint32_t max_vocab = 0;  // model.vocab_size: no shard's vocabulary may exceed it
  int seq_len = 0;         // every shard read must hold one window: seq_len + 1 tokens
  bool val = true;         // whether val.bin is read at all (a run that never validates skips it)
  std::string val_why;     // why the run needs validation data, for the message ("it validates at
                           // step 60"); empty: nothing is added
};

struct DatasetHeaders {
  ShardHeader train;
  std::optional<ShardHeader> val;  // set when needs.val
};

// Checks DIR/train.bin and, when needs.val, DIR/val.bin from their headers only
// (read_shard_header: one header of at most 56 bytes each, so it answers at once for any size):
// that each exists and is a well-formed shard, that its vocabulary is at most needs.max_vocab, and
// that it holds at least one window. Throws DataError whose message starts with the offending file.
// The checksum and the tokens are left to TokenShard::open.
DatasetHeaders check_dataset(const std::filesystem::path& dir, const DatasetNeeds& needs);

// The same check of DIR/val.bin alone (needs.val is ignored; needs.val_why is added as above), for
// a reader of validation data only (`loopmoe eval`), which does not need train.bin.
ShardHeader check_validation_shard(const std::filesystem::path& dir, const DatasetNeeds& needs);

}  // namespace loopmoe::dataloader
