// Durable atomic file writes. The bytes go to PATH.tmp in the target's directory; commit() fsyncs
// it, renames it over PATH and fsyncs the directory. Readers see either the old file or the
// complete new one, and once commit() returns the new one survives a crash. A write that fails
// (or a writer destroyed without commit()) removes PATH.tmp and leaves PATH as it was.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

#include "common/file_error.h"

namespace loopmoe::common {

// The step of an atomic write that failed.
enum class WriteStep {
  kCreate,         // creating the temporary file
  kWrite,          // writing to it
  kSync,           // fsync of it
  kClose,          // closing it
  kRename,         // renaming it over the target
  kOpenDirectory,  // opening the target's directory (for its fsync)
  kSyncDirectory,  // fsync of the directory
};

struct WriteFailure {
  WriteStep step;
  std::filesystem::path path;       // the target
  std::filesystem::path tmp;        // the temporary file: path + ".tmp"
  std::filesystem::path directory;  // the target's directory ("." for a bare file name)
  int error = 0;                    // errno

  // The default message, naming the file the step works on and the errno text:
  // "<tmp>: cannot create: <reason>", "<tmp>: write failed: <reason>", "<tmp>: fsync failed:
  // <reason>", "<tmp>: close failed: <reason>", "<path>: cannot rename <tmp> into place: <reason>",
  // "<directory>: cannot open directory for fsync: <reason>", "<directory>: fsync failed:
  // <reason>".
  std::string message() const;
};

// Turns a failure into the caller's exception (its own type and wording). It must throw; if it
// returns, FileError(failure.message()) is thrown.
using WriteErrorHandler = void (*)(const WriteFailure& failure);

// The default handler: throws FileError(failure.message()).
[[noreturn]] void throw_file_error(const WriteFailure& failure);

// Streams a file to PATH.tmp; commit() puts it in place. Not copyable; one commit() per writer.
class AtomicFileWriter {
 public:
  // Creates PATH.tmp (mode 0644 before the umask), truncating a stale one.
  explicit AtomicFileWriter(std::filesystem::path path,
                            WriteErrorHandler on_error = throw_file_error);
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;
  // Without a successful commit(): closes and removes PATH.tmp; PATH is untouched.
  ~AtomicFileWriter();

  void write(const void* data, size_t bytes);
  void write(std::string_view bytes) { write(bytes.data(), bytes.size()); }
  // Writes at `offset` of the temporary file (e.g. a header once its checksum is known).
  void pwrite(const void* data, size_t bytes, uint64_t offset);
  // fsync, close, rename over PATH, fsync of the directory.
  void commit();

  const std::filesystem::path& path() const { return path_; }
  const std::filesystem::path& tmp_path() const { return tmp_; }

 private:
  [[noreturn]] void fail(WriteStep step, int error) const;

  std::filesystem::path path_;
  std::filesystem::path tmp_;
  WriteErrorHandler on_error_;
  int fd_ = -1;
  bool renamed_ = false;
};

// Replaces `path` with `bytes` through an AtomicFileWriter.
void write_file_atomically(const std::filesystem::path& path, std::string_view bytes,
                           WriteErrorHandler on_error = throw_file_error);

}  // namespace loopmoe::common
