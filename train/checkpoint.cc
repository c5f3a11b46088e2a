#include "train/checkpoint.h"

#include <xxhash.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <vector>

#include "common/atomic_file.h"
#include "model/error.h"

namespace loopmoe::train {
namespace {

constexpr char kMagic[8] = {'L', 'M', 'O', 'E', 'C', 'K', 'P', 'T'};
// Version 2 appends header_checksum to version 1's header; version 1 files are still read (their
// header is unchecked, as it always was).
constexpr uint32_t kVersion = 2;

// Fixed-size little-endian header; the payload follows: config text, params, m, v (float32).
struct Header {
  char magic[8];
  uint32_t version;
  uint32_t threads;
  uint64_t config_bytes;
  uint64_t num_params;
  int64_t step;
  int64_t adam_steps;
  uint64_t sampler_seed, sampler_epoch, sampler_index;
  uint64_t checksum;  // XXH64 of the payload
  // Version 2 only: XXH64 of the header bytes before it. They include the payload's checksum, so
  // together the two cover every byte of the file.
  uint64_t header_checksum;
};
constexpr size_t kHeaderBytesV1 = offsetof(Header, header_checksum);
static_assert(kHeaderBytesV1 == 80 && sizeof(Header) == 88, "the header layout is the format");

uint64_t header_checksum(const Header& h) { return XXH64(&h, kHeaderBytesV1, 0); }
size_t header_bytes(const Header& h) { return h.version == 1 ? kHeaderBytesV1 : sizeof(Header); }

// A failed checkpoint write, worded as the checkpoint's errors always were.
void throw_checkpoint_error(const common::WriteFailure& f) {
  switch (f.step) {
    case common::WriteStep::kCreate:
      throw model::CheckpointError(f.tmp.string() + ": cannot create checkpoint file");
    case common::WriteStep::kWrite:
    case common::WriteStep::kClose:
      throw model::CheckpointError(f.tmp.string() + ": write failed (disk full?)");
    case common::WriteStep::kSync:
      throw model::CheckpointError(f.tmp.string() + ": fsync failed");
    case common::WriteStep::kOpenDirectory:
      throw model::CheckpointError(f.directory.string() + ": cannot open for fsync");
    case common::WriteStep::kSyncDirectory:
      throw model::CheckpointError(f.directory.string() + ": fsync failed");
    case common::WriteStep::kRename:
      break;
  }
  throw model::CheckpointError(f.message());
}

struct Loaded {
  Header header;
  std::string config_text;
  std::vector<float> params, m, v;
};

// Reads and checks the header: magic, version and (version 2) the header checksum, so that no
// field of a version 2 header is used unverified.
Header read_header(std::ifstream& in, const std::string& path) {
  if (!in) throw model::CheckpointError(path + ": cannot open checkpoint");
  Header h{};
  in.read(reinterpret_cast<char*>(&h), kHeaderBytesV1);
  const auto truncated = [&] {
    throw model::CheckpointError(path + ": truncated checkpoint (no complete header)");
  };
  if (in.gcount() >= 8 && std::memcmp(h.magic, kMagic, 8) != 0) {
    throw model::CheckpointError(path + ": not a LoopMoE checkpoint (bad magic)");
  }
  if (!in) truncated();
  if (h.version != 1 && h.version != kVersion) {
    throw model::CheckpointError(path + ": checkpoint version " + std::to_string(h.version) +
                                 " is not supported (this build reads versions 1 and " +
                                 std::to_string(kVersion) +
                                 "; a corrupt file, or one from a newer LoopMoE)");
  }
  if (h.version >= 2) {
    in.read(reinterpret_cast<char*>(&h.header_checksum), sizeof h.header_checksum);
    if (!in) truncated();
    if (h.header_checksum != header_checksum(h)) {
      throw model::CheckpointError(path + ": header checksum mismatch (corrupt file)");
    }
  }
  return h;
}

// The file size a header implies; the maximum uint64 where that overflows (only a corrupt
// version 1 header can say so).
uint64_t implied_size(const Header& h) {
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  if (h.num_params > kMax / 4 / (3 * sizeof(float)) || h.config_bytes > kMax / 4) return kMax;
  return header_bytes(h) + h.config_bytes + 3 * h.num_params * sizeof(float);
}

Loaded read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  Loaded l;
  l.header = read_header(in, path);
  const uint64_t n = l.header.num_params;
  const uint64_t want = implied_size(l.header);
  const uint64_t have = std::filesystem::file_size(path);
  if (have < want) {
    throw model::CheckpointError(path + ": truncated checkpoint: header implies " +
                                 std::to_string(want) + " bytes, file has " + std::to_string(have));
  }
  if (have > want) {
    throw model::CheckpointError(path + ": trailing bytes after the checkpoint: header implies " +
                                 std::to_string(want) + " bytes, file has " + std::to_string(have));
  }
  l.config_text.resize(l.header.config_bytes);
  l.params.resize(n);
  l.m.resize(n);
  l.v.resize(n);
  in.read(l.config_text.data(), static_cast<std::streamsize>(l.config_text.size()));
  for (auto* buf : {&l.params, &l.m, &l.v}) {
    in.read(reinterpret_cast<char*>(buf->data()), static_cast<std::streamsize>(n * sizeof(float)));
  }
  if (!in) throw model::CheckpointError(path + ": read error");
  XXH64_state_t* st = XXH64_createState();
  XXH64_reset(st, 0);
  XXH64_update(st, l.config_text.data(), l.config_text.size());
  for (auto* buf : {&l.params, &l.m, &l.v}) XXH64_update(st, buf->data(), n * sizeof(float));
  const uint64_t sum = XXH64_digest(st);
  XXH64_freeState(st);
  if (sum != l.header.checksum)
    throw model::CheckpointError(path + ": checksum mismatch (corrupt file)");
  return l;
}

}  // namespace

void save_checkpoint(const std::string& path, const model::Config& config,
                     const model::Model& model, model::AdamW& opt, const TrainProgress& progress) {
  const std::string text = model::to_toml(config);
  const size_t n = model.num_params();
  Header h{};
  std::memcpy(h.magic, kMagic, 8);
  h.version = kVersion;
  h.threads = static_cast<uint32_t>(progress.threads);
  h.config_bytes = text.size();
  h.num_params = n;
  h.step = progress.step;
  h.adam_steps = opt.steps_taken();
  h.sampler_seed = progress.sampler.seed;
  h.sampler_epoch = progress.sampler.epoch;
  h.sampler_index = progress.sampler.index;
  XXH64_state_t* st = XXH64_createState();
  XXH64_reset(st, 0);
  XXH64_update(st, text.data(), text.size());
  // Host views of the model's arrays: the storage itself on the CPU, a copy from a device.
  std::vector<float> params_copy, m_copy, v_copy;
  const float* params = model.param_buffer().host_view(params_copy);
  const float* m = opt.m_buffer().host_view(m_copy);
  const float* v = opt.v_buffer().host_view(v_copy);
  XXH64_update(st, params, n * sizeof(float));
  XXH64_update(st, m, n * sizeof(float));
  XXH64_update(st, v, n * sizeof(float));
  h.checksum = XXH64_digest(st);
  XXH64_freeState(st);
  h.header_checksum = header_checksum(h);

  common::AtomicFileWriter out(path, throw_checkpoint_error);
  out.write(&h, sizeof(h));
  out.write(text);
  out.write(params, n * sizeof(float));
  out.write(m, n * sizeof(float));
  out.write(v, n * sizeof(float));
  out.commit();
}

int64_t read_checkpoint_step(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return read_header(in, path).step;
}

model::Config read_checkpoint_config(const std::string& path) {
  Loaded l = read_file(path);
  return model::parse_config(l.config_text, path + " (stored config)");
}

std::unique_ptr<model::Model> load_model(const std::string& path, model::Config* config) {
  Loaded l = read_file(path);
  *config = model::parse_config(l.config_text, path + " (stored config)");
  auto model = std::make_unique<model::Model>(config->model);
  if (l.header.num_params != model->num_params()) {
    throw model::CheckpointError(path + ": parameter count differs from the stored config's model");
  }
  model->load_params(l.params.data(), l.params.size());
  return model;
}

TrainProgress load_checkpoint(const std::string& path, const model::Config& config,
                              model::Model& model, model::AdamW& opt) {
  Loaded l = read_file(path);
  const std::string want = model::to_toml(config);
  if (l.config_text != want) {
    std::istringstream a(l.config_text), b(want);
    std::string la, lb, diff;
    while (std::getline(a, la) && std::getline(b, lb)) {
      if (la != lb) diff += "\n  checkpoint: " + la + "\n  requested:  " + lb;
    }
    throw model::CheckpointError(path + ": checkpoint was written with a different config:" + diff);
  }
  if (l.header.num_params != model.num_params()) {
    throw model::CheckpointError(path + ": parameter count differs from the model");
  }
  model.load_params(l.params.data(), l.params.size());
  opt.m_buffer().copy_from_host(0, l.m.data(), l.m.size());
  opt.v_buffer().copy_from_host(0, l.v.data(), l.v.size());
  opt.set_steps_taken(l.header.adam_steps);
  TrainProgress p;
  p.step = l.header.step;
  p.sampler = {l.header.sampler_seed, l.header.sampler_epoch, l.header.sampler_index};
  p.threads = static_cast<int>(l.header.threads);
  return p;
}

}  // namespace loopmoe::train
