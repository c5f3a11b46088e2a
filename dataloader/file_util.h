// common/atomic_file.h with dataloader's error type: failures throw DataError (internal to
// dataloader/; runtime/process_checkpoint.cc uses the writer too).
#pragma once

#include <filesystem>
#include <utility>

#include "common/atomic_file.h"

namespace loopmoe::dataloader {

// Throws DataError(failure.message()): the file first, then what failed and why.
[[noreturn]] void throw_data_error(const common::WriteFailure& failure);

// common::AtomicFileWriter throwing DataError: PATH.tmp, and on commit() fsync, rename over PATH,
// directory fsync. Destroying it without commit() removes the temporary file.
class AtomicFileWriter : public common::AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::filesystem::path path)
      : common::AtomicFileWriter(std::move(path), throw_data_error) {}
};

}  // namespace loopmoe::dataloader
