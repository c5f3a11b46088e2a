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

// Test hook for the crash-consistency tests (tests/test_crash_consistency.cc): the process kills
// itself with SIGKILL at one point of commit(), as a crash or `kill -9` would stop it there (no
// destructor runs, PATH.tmp stays behind). Points, in commit()'s order:
//   after-write    all bytes written to PATH.tmp, before its fsync
//   after-fsync    PATH.tmp fsynced, before close
//   before-rename  PATH.tmp closed, before the rename over PATH
//   after-rename   PATH replaced, before the directory's fsync
// Two ways to arm it: the environment variable LOOPMOE_FAULT_INJECT="<point>[:<nth>[:<name>]]"
// (read once, at the first commit(): for child processes such as `loopmoe train`), or
// set_fault_injection() in the process itself (a forked test child; it overrides the variable).
// `nth` (default 1) picks the nth commit() that reaches the point, counting only targets whose
// file name is `name` when one is given (e.g. "before-rename:2:checkpoint.bin" dies while the
// second checkpoint.bin is written). Unarmed, commit() pays one relaxed atomic load. Never set in
// production; a malformed variable makes commit() throw std::invalid_argument.
enum class FaultPoint { kNone, kAfterWrite, kAfterFsync, kBeforeRename, kAfterRename };

struct FaultInjection {
  FaultPoint point = FaultPoint::kNone;
  int nth = 1;            // >= 1
  std::string file_name;  // only targets with this file name; empty: every target
};

// Parses "<point>[:<nth>[:<name>]]" (points as above); throws std::invalid_argument naming what is
// wrong.
FaultInjection parse_fault_injection(std::string_view text);

// Arms (or with FaultPoint::kNone disarms) the hook for this process and resets its count.
void set_fault_injection(const FaultInjection& injection);

// Replaces `path` with `bytes` through an AtomicFileWriter.
void write_file_atomically(const std::filesystem::path& path, std::string_view bytes,
                           WriteErrorHandler on_error = throw_file_error);

}  // namespace loopmoe::common
