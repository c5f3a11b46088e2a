#include "runtime/process_checkpoint.h"

#include <xxhash.h>

#include <cstddef>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include "dataloader/file_util.h"
#include "model/error.h"

namespace loopmoe::runtime {
namespace {

// Version 2 appends header_checksum to version 1's header. Version 1 files (a job committed
// before the upgrade) are still read, with their header unchecked as it always was.
constexpr uint32_t kVersion = 2;

struct WorkerHeader {
  char magic[8];
  uint32_t version, rank;
  int64_t step, adam_steps;
  uint64_t sampler_seed, sampler_epoch, sampler_index;
  uint64_t config_hash;
  uint64_t num_floats;  // per array (params, m, v)
  uint64_t checksum;    // XXH64 of the payload
  // Version 2: XXH64 of the header bytes before it (which include the payload's checksum, so it
  // stands for the whole file: write_*_checkpoint returns it).
  uint64_t header_checksum;
};
static_assert(offsetof(WorkerHeader, header_checksum) == 80 && sizeof(WorkerHeader) == 88);
constexpr char kWorkerMagic[8] = {'L', 'M', 'O', 'E', 'W', 'R', 'K', 'R'};

struct ShardHeader {
  char magic[8];
  uint32_t version, rank;
  int64_t step, adam_steps;
  uint64_t config_hash;
  uint32_t num_layers, first_expert, num_experts, reserved;
  uint64_t floats_per_expert;
  uint64_t checksum;         // XXH64 of the payload
  uint64_t header_checksum;  // version 2, as in WorkerHeader
};
static_assert(offsetof(ShardHeader, header_checksum) == 72 && sizeof(ShardHeader) == 80);
constexpr char kShardMagic[8] = {'L', 'M', 'O', 'E', 'S', 'H', 'R', 'D'};

// Version 1's header: everything before header_checksum.
template <typename Header>
constexpr size_t v1_header_bytes() {
  return offsetof(Header, header_checksum);
}
template <typename Header>
uint64_t header_checksum(const Header& h) {
  return XXH64(&h, v1_header_bytes<Header>(), 0);
}

uint64_t payload_checksum(const std::vector<float>& a, const std::vector<float>& b,
                          const std::vector<float>& c) {
  XXH64_state_t* st = XXH64_createState();
  XXH64_reset(st, 0);
  for (const auto* v : {&a, &b, &c}) XXH64_update(st, v->data(), v->size() * sizeof(float));
  const uint64_t sum = XXH64_digest(st);
  XXH64_freeState(st);
  return sum;
}

template <typename Header>
uint64_t write_file(const std::string& path, Header h, const std::vector<float>& params,
                    const std::vector<float>& m, const std::vector<float>& v, int64_t* bytes) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  h.checksum = payload_checksum(params, m, v);
  h.header_checksum = header_checksum(h);
  try {
    dataloader::AtomicFileWriter out(path);
    out.write(&h, sizeof(h));
    for (const auto* a : {&params, &m, &v}) out.write(a->data(), a->size() * sizeof(float));
    out.commit();
  } catch (const std::exception& e) {
    throw model::CheckpointError(std::string("cannot write checkpoint: ") + e.what());
  }
  if (bytes) *bytes = static_cast<int64_t>(sizeof(h) + 3 * params.size() * sizeof(float));
  return h.header_checksum;
}

// Reads header and the three arrays of `n(header)` floats, verifying the header checksum (version
// 2) before using any field past the version, then the size and the payload checksum.
template <typename Header, typename Count>
Header read_file(const std::string& path, const char (&magic)[8], uint64_t expected_checksum,
                 Count n_of, std::vector<float>& params, std::vector<float>& m,
                 std::vector<float>& v) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw model::CheckpointError(path + ": cannot open checkpoint file");
  Header h{};
  in.read(reinterpret_cast<char*>(&h), v1_header_bytes<Header>());
  const auto truncated = [&] {
    throw model::CheckpointError(path + ": truncated checkpoint file (no complete header)");
  };
  if (in.gcount() >= 8 && std::memcmp(h.magic, magic, 8) != 0) {
    throw model::CheckpointError(path + ": not a LoopMoE " +
                                 std::string(magic[4] == 'W' ? "worker" : "expert shard") +
                                 " checkpoint file (bad magic)");
  }
  if (!in) truncated();
  if (h.version != 1 && h.version != kVersion) {
    throw model::CheckpointError(path + ": checkpoint file version " + std::to_string(h.version) +
                                 " is not supported (this build reads versions 1 and " +
                                 std::to_string(kVersion) +
                                 "; a corrupt file, or one from a newer LoopMoE)");
  }
  const size_t header_bytes = h.version == 1 ? v1_header_bytes<Header>() : sizeof(Header);
  if (h.version >= 2) {
    in.read(reinterpret_cast<char*>(&h.header_checksum), sizeof h.header_checksum);
    if (!in) truncated();
    if (h.header_checksum != header_checksum(h)) {
      throw model::CheckpointError(path + ": header checksum mismatch (file is corrupt)");
    }
  }
  // The size the header implies, without overflow (a corrupt version 1 header can say anything).
  const uint64_t n = n_of(h);
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  const uint64_t want =
      n > kMax / 4 / (3 * sizeof(float)) ? kMax : header_bytes + 3 * n * sizeof(float);
  const uint64_t have = std::filesystem::file_size(path);
  if (have < want) {
    throw model::CheckpointError(path + ": truncated checkpoint file: header implies " +
                                 std::to_string(want) + " bytes, file has " + std::to_string(have));
  }
  if (have > want) {
    throw model::CheckpointError(
        path + ": trailing bytes after the checkpoint file's data: header implies " +
        std::to_string(want) + " bytes, file has " + std::to_string(have));
  }
  for (auto* a : {&params, &m, &v}) {
    a->resize(n);
    in.read(reinterpret_cast<char*>(a->data()), static_cast<std::streamsize>(n * sizeof(float)));
  }
  if (!in) throw model::CheckpointError(path + ": read error");
  const uint64_t sum = payload_checksum(params, m, v);
  if (sum != h.checksum)
    throw model::CheckpointError(path + ": checksum mismatch (file is corrupt)");
  // What the writer returned and the coordinator recorded: the header checksum (version 2) or
  // the payload checksum (version 1).
  const uint64_t file_checksum = h.version == 1 ? sum : h.header_checksum;
  if (expected_checksum != 0 && file_checksum != expected_checksum) {
    throw model::CheckpointError(path +
                                 ": checksum differs from the one recorded in the checkpoint "
                                 "metadata (file replaced or rewritten)");
  }
  return h;
}

}  // namespace

uint64_t config_hash(const std::string& canonical_config) {
  return XXH64(canonical_config.data(), canonical_config.size(), 0);
}

uint64_t write_worker_checkpoint(const std::string& path, const WorkerCheckpoint& c,
                                 int64_t* bytes) {
  WorkerHeader h{};
  std::memcpy(h.magic, kWorkerMagic, 8);
  h.version = kVersion;
  h.rank = static_cast<uint32_t>(c.rank);
  h.step = c.step;
  h.adam_steps = c.adam_steps;
  h.sampler_seed = c.sampler.seed;
  h.sampler_epoch = c.sampler.epoch;
  h.sampler_index = c.sampler.index;
  h.config_hash = c.config_hash;
  h.num_floats = c.params.size();
  return write_file(path, h, c.params, c.m, c.v, bytes);
}

uint64_t write_shard_checkpoint(const std::string& path, const ShardCheckpoint& c, int64_t* bytes) {
  ShardHeader h{};
  std::memcpy(h.magic, kShardMagic, 8);
  h.version = kVersion;
  h.rank = static_cast<uint32_t>(c.rank);
  h.step = c.step;
  h.adam_steps = c.adam_steps;
  h.config_hash = c.config_hash;
  h.num_layers = static_cast<uint32_t>(c.num_layers);
  h.first_expert = static_cast<uint32_t>(c.first_expert);
  h.num_experts = static_cast<uint32_t>(c.num_experts);
  h.floats_per_expert = c.floats_per_expert;
  return write_file(path, h, c.params, c.m, c.v, bytes);
}

WorkerCheckpoint read_worker_checkpoint(const std::string& path, uint64_t expected_checksum) {
  WorkerCheckpoint c;
  const WorkerHeader h = read_file<WorkerHeader>(
      path, kWorkerMagic, expected_checksum, [](const WorkerHeader& w) { return w.num_floats; },
      c.params, c.m, c.v);
  c.rank = static_cast<int>(h.rank);
  c.step = h.step;
  c.adam_steps = h.adam_steps;
  c.sampler = {h.sampler_seed, h.sampler_epoch, h.sampler_index};
  c.config_hash = h.config_hash;
  return c;
}

ShardCheckpoint read_shard_checkpoint(const std::string& path, uint64_t expected_checksum) {
  ShardCheckpoint c;
  const ShardHeader h = read_file<ShardHeader>(
      path, kShardMagic, expected_checksum,
      [](const ShardHeader& s) {
        // A count that wraps around is no count: read as too large for any file.
        uint64_t n = 0;
        return __builtin_mul_overflow(uint64_t{s.num_layers} * s.num_experts, s.floats_per_expert,
                                      &n)
                   ? std::numeric_limits<uint64_t>::max()
                   : n;
      },
      c.params, c.m, c.v);
  c.rank = static_cast<int>(h.rank);
  c.step = h.step;
  c.adam_steps = h.adam_steps;
  c.config_hash = h.config_hash;
  c.num_layers = static_cast<int>(h.num_layers);
  c.first_expert = static_cast<int>(h.first_expert);
  c.num_experts = static_cast<int>(h.num_experts);
  c.floats_per_expert = h.floats_per_expert;
  return c;
}

}  // namespace loopmoe::runtime
