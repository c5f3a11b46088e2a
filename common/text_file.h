// Whole-file reads.
#pragma once

#include <filesystem>
#include <optional>
#include <string>

#include "common/file_error.h"

namespace loopmoe::common {

// The whole file, byte for byte. Throws FileError "<path>: cannot open: <reason>" when it cannot be
// opened (missing, unreadable) and "<path>: read failed" when reading fails.
std::string read_text(const std::filesystem::path& path);

// As read_text, but nullopt when the file cannot be opened.
std::optional<std::string> read_text_if_present(const std::filesystem::path& path);

// read_text with the caller's exception type (same message), e.g.
// read_text_as<dataloader::DataError>.
template <class Error>
std::string read_text_as(const std::filesystem::path& path) {
  try {
    return read_text(path);
  } catch (const FileError& e) {
    throw Error(e.what());
  }
}

}  // namespace loopmoe::common
