// Internal file helpers for dataloader/ (not part of its public API).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

namespace loopmoe::data {

// Writes `path` + ".tmp" and, on commit(), fsyncs it, renames it over `path` and fsyncs the
// directory: readers see either the old file or the complete new one. Destroying the writer
// without commit() removes the temporary file (e.g. when an exception unwinds).
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::filesystem::path path);
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;
  ~AtomicFileWriter();

  void write(const void* data, size_t bytes);
  void pwrite(const void* data, size_t bytes, uint64_t offset);
  void commit();

 private:
  [[noreturn]] void fail(const std::string& what) const;

  std::filesystem::path path_;
  std::filesystem::path tmp_;
  int fd_ = -1;
};

void write_file_atomic(const std::filesystem::path& path, std::string_view contents);

// Reads a whole file; throws DataError naming it on failure.
std::string read_file(const std::filesystem::path& path);

}  // namespace loopmoe::data
