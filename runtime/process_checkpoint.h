// The files of a distributed checkpoint (docs/SERVICE_CHECKPOINTS in docs/ARCHITECTURE.md):
// - worker-<rank>.bin: a worker's replica: every parameter that is not an expert's (in layout
//   order), with its AdamW m and v, the step, AdamW's step count and the data-loader position.
//   Workers are replicas, so any worker's file restores any worker.
// - shard-<rank>.bin: the experts [first, first + count) of every unique layer with their m and v,
//   keyed by global expert id, so a checkpoint restores onto any number of shards.
// Each is a fixed header then float32 payload (format: docs/DATA.md "Checkpoint files"): XXH64 of
// the payload in the header, and (version 2) an XXH64 of the header ending it, so any changed byte
// is detected; written to a temporary file, fsynced and renamed. Errors throw CheckpointError
// naming the file. Version 1 files are still read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dataloader/sampler.h"

namespace loopmoe::runtime {

struct WorkerCheckpoint {
  int rank = 0;
  int64_t step = 0, adam_steps = 0;
  dataloader::SamplerState sampler;
  uint64_t config_hash = 0;
  std::vector<float> params, m, v;  // the replica ranges, packed
};

struct ShardCheckpoint {
  int rank = 0;
  int64_t step = 0, adam_steps = 0;
  uint64_t config_hash = 0;
  int num_layers = 0, first_expert = 0, num_experts = 0;
  uint64_t floats_per_expert = 0;
  // [layer][expert - first][floats_per_expert] each: w1, w3, w2 of the expert back to back.
  std::vector<float> params, m, v;
};

// Both return the file's checksum (its header checksum, which covers the payload's checksum and
// so the whole file) for the checkpoint metadata; *bytes gets the file size.
uint64_t write_worker_checkpoint(const std::string& path, const WorkerCheckpoint& c,
                                 int64_t* bytes);
uint64_t write_shard_checkpoint(const std::string& path, const ShardCheckpoint& c, int64_t* bytes);
// Verify header checksum, size and payload checksum whatever `expected_checksum` is, and that the
// file's checksum equals `expected_checksum` when that is non-zero (0: nothing recorded). For a
// version 1 file the file's checksum is the payload's, as version 1 writers returned.
WorkerCheckpoint read_worker_checkpoint(const std::string& path, uint64_t expected_checksum);
ShardCheckpoint read_shard_checkpoint(const std::string& path, uint64_t expected_checksum);

// XXH64 of a config's canonical text.
uint64_t config_hash(const std::string& canonical_config);

}  // namespace loopmoe::runtime
