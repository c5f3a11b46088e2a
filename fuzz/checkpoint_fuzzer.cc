// Single-process checkpoint files (train/checkpoint.cc, magic LMOECKPT, versions 1 and 2): the
// input is written as a checkpoint file and read the ways `loopmoe train --resume` and
// `loopmoe eval` read one (read_checkpoint_step, read_checkpoint_config, load_checkpoint into the
// tiny model of tiny_config.h, and load_model where the stored config is small). A file is
// refused with a CheckpointError (or the ConfigError of its stored config) or accepted. A second
// pass repairs the header and payload checksums of an input that starts like a checkpoint, so that
// the fuzzer gets past them to the size checks and the stored config.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "fuzz/fuzz_util.h"
#include "fuzz/tiny_config.h"
#include "model/budget.h"
#include "model/config.h"
#include "model/error.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "train/checkpoint.h"

namespace loopmoe::fuzz {
namespace {

// Offsets of the format (docs/DATA.md "Checkpoint files").
constexpr size_t kVersionAt = 8, kChecksumAt = 72, kHeaderBytesV1 = 80, kHeaderBytes = 88;

struct Target {
  model::Config config = tiny_config();
  model::Model model{config.model};
  model::AdamW adam{model.layout(), config.train};
};

Target& target() {
  static Target* t = new Target;
  return *t;
}

void fuzz_file(std::string_view bytes) {
  const std::string path = write_scratch("checkpoint.bin", bytes).string();
  try {
    (void)train::read_checkpoint_step(path);
  } catch (const model::CheckpointError&) {
  }
  std::optional<model::Config> stored;
  try {
    stored = train::read_checkpoint_config(path);
  } catch (const model::CheckpointError&) {
  } catch (const model::ConfigError&) {
  }
  Target& t = target();
  try {
    const train::TrainProgress p = train::load_checkpoint(path, t.config, t.model, t.adam);
    check(stored.has_value() && model::to_toml(*stored) == model::to_toml(t.config),
          "load_checkpoint accepted a file whose stored config is not the model's");
    (void)p;
  } catch (const model::CheckpointError&) {
  }
  // load_model builds the model the file describes: only where that is small, as a real model
  // would need real memory whatever the file's size.
  if (stored && model::budget_figures(stored->model, stored->model.seq_len).total_params < 1e5 &&
      stored->model.seq_len <= 1024) {
    try {
      model::Config config;
      const std::unique_ptr<model::Model> m = train::load_model(path, &config);
      check(m != nullptr && model::to_toml(config) == model::to_toml(*stored),
            "load_model returned another config than read_checkpoint_config");
    } catch (const model::CheckpointError&) {
    }
  }
}

std::optional<std::string> with_checksums(std::string_view bytes) {
  if (bytes.size() < kHeaderBytesV1 || bytes.substr(0, 8) != "LMOECKPT") return std::nullopt;
  const uint32_t version = load_le<uint32_t>(bytes, kVersionAt);
  const size_t header_bytes = version == 1 ? kHeaderBytesV1 : kHeaderBytes;
  if (bytes.size() < header_bytes) return std::nullopt;
  std::string fixed(bytes);
  store_le<uint64_t>(fixed, kChecksumAt, xxh64(fixed, header_bytes));
  if (version != 1) store_le<uint64_t>(fixed, kHeaderBytesV1, xxh64(fixed, 0, kHeaderBytesV1));
  if (fixed == bytes) return std::nullopt;
  return fixed;
}

}  // namespace
}  // namespace loopmoe::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes = loopmoe::fuzz::as_text(data, size);
  loopmoe::fuzz::fuzz_file(bytes);
  if (auto fixed = loopmoe::fuzz::with_checksums(bytes)) loopmoe::fuzz::fuzz_file(*fixed);
  return 0;
}
