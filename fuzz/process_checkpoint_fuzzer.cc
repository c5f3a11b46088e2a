// The distributed service's checkpoint files (runtime/process_checkpoint.cc): a worker's replica
// (magic LMOEWRKR) and an expert shard's experts (LMOESHRD), versions 1 and 2, as a restarted job
// reads them. The input is written as a file and read as both kinds (one refuses it by its magic),
// with no recorded checksum and with the file's own; a file is refused with a CheckpointError or
// accepted, and an accepted shard file must hold the experts its header describes. A second pass
// repairs the checksums of an input that starts like either kind.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "fuzz/fuzz_util.h"
#include "model/error.h"
#include "runtime/process_checkpoint.h"

namespace loopmoe::fuzz {
namespace {

// Offsets of the formats (runtime/process_checkpoint.cc): version at 8 in both; the payload
// checksum and (version 2) the header checksum ending the header.
struct Layout {
  const char* magic;
  size_t checksum_at, header_bytes_v1, header_bytes;
};
constexpr Layout kWorker{"LMOEWRKR", 72, 80, 88};
constexpr Layout kShard{"LMOESHRD", 64, 72, 80};

void fuzz_file(std::string_view bytes) {
  const std::string path = write_scratch("checkpoint.bin", bytes).string();
  for (uint64_t expected : {uint64_t{0}, bytes.size() >= 88 ? load_le<uint64_t>(bytes, 80) : 1}) {
    try {
      const runtime::WorkerCheckpoint c = runtime::read_worker_checkpoint(path, expected);
      check(c.m.size() == c.params.size() && c.v.size() == c.params.size(),
            "a worker checkpoint's arrays differ in size");
    } catch (const model::CheckpointError&) {
    }
  }
  for (uint64_t expected : {uint64_t{0}, bytes.size() >= 80 ? load_le<uint64_t>(bytes, 72) : 1}) {
    try {
      const runtime::ShardCheckpoint c = runtime::read_shard_checkpoint(path, expected);
      // The layout the header describes, [layer][expert][floats_per_expert], must be the data's
      // (restoring a shard indexes params by it), without wrapping around.
      const unsigned __int128 floats =
          static_cast<unsigned __int128>(static_cast<uint32_t>(c.num_layers)) *
          static_cast<uint32_t>(c.num_experts) * c.floats_per_expert;
      check(floats == c.params.size() && c.m.size() == c.params.size() &&
                c.v.size() == c.params.size(),
            "a shard checkpoint's header describes " + std::to_string(c.num_layers) + " layers x " +
                std::to_string(c.num_experts) + " experts x " +
                std::to_string(c.floats_per_expert) + " floats but it holds " +
                std::to_string(c.params.size()));
    } catch (const model::CheckpointError&) {
    }
  }
}

std::optional<std::string> with_checksums(std::string_view bytes) {
  for (const Layout& l : {kWorker, kShard}) {
    if (bytes.size() < l.header_bytes_v1 || bytes.substr(0, 8) != l.magic) continue;
    const uint32_t version = load_le<uint32_t>(bytes, 8);
    const size_t header_bytes = version == 1 ? l.header_bytes_v1 : l.header_bytes;
    if (bytes.size() < header_bytes) return std::nullopt;
    std::string fixed(bytes);
    store_le<uint64_t>(fixed, l.checksum_at, xxh64(fixed, header_bytes));
    if (version != 1) {
      store_le<uint64_t>(fixed, l.header_bytes_v1, xxh64(fixed, 0, l.header_bytes_v1));
    }
    if (fixed == bytes) return std::nullopt;
    return fixed;
  }
  return std::nullopt;
}

}  // namespace
}  // namespace loopmoe::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes = loopmoe::fuzz::as_text(data, size);
  loopmoe::fuzz::fuzz_file(bytes);
  if (auto fixed = loopmoe::fuzz::with_checksums(bytes)) loopmoe::fuzz::fuzz_file(*fixed);
  return 0;
}
