// Local training checkpoints: one file holding config, parameters, AdamW moments, step and the
// data position, checksummed (header and payload) and written atomically (format: docs/DATA.md
// "Checkpoint files"). Every reader throws CheckpointError naming the file.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "dataloader/sampler.h"
#include "model/config.h"
#include "model/model.h"
#include "model/optimizer.h"

namespace loopmoe::train {

struct TrainProgress {
  int64_t step = 0;  // steps completed
  dataloader::SamplerState sampler;
  int threads = 1;  // bit-exact continuation needs the same thread count
};

// Writes path.tmp, fsyncs it, renames it over path and fsyncs the directory
// (common::AtomicFileWriter); failures throw CheckpointError naming the file.
void save_checkpoint(const std::string& path, const model::Config& config,
                     const model::Model& model, model::AdamW& optimizer,
                     const TrainProgress& progress);

// The steps a checkpoint says are done, from its header alone (magic, version and the header
// checksum checked, not the payload's): enough to plan a resumed run before loading it. A
// version 1 file has no header checksum; its step is verified only by the full load.
int64_t read_checkpoint_step(const std::string& path);

// Reads the config stored in a checkpoint (validated, checksum verified).
model::Config read_checkpoint_config(const std::string& path);

// The model a checkpoint holds, for evaluation: built from the stored config (returned in
// *config) with the stored parameters; the file is read and verified once.
std::unique_ptr<model::Model> load_model(const std::string& path, model::Config* config);

// Loads parameters, optimizer state and progress into `model` / `optimizer`. The checkpoint's
// config must equal `config` (field by field; the differences are listed otherwise).
TrainProgress load_checkpoint(const std::string& path, const model::Config& config,
                              model::Model& model, model::AdamW& optimizer);

}  // namespace loopmoe::train
