// Durable atomic file writes (atomic_file.h): temporary file, fsync, rename, directory fsync.
#include "common/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <system_error>
#include <utility>

namespace loopmoe::common {
namespace {

std::filesystem::path directory_of(const std::filesystem::path& path) {
  std::filesystem::path dir = path.parent_path();
  return dir.empty() ? std::filesystem::path(".") : dir;
}

}  // namespace

std::string WriteFailure::message() const {
  const std::string reason = std::strerror(error);
  switch (step) {
    case WriteStep::kCreate:
      return tmp.string() + ": cannot create: " + reason;
    case WriteStep::kWrite:
      return tmp.string() + ": write failed: " + reason;
    case WriteStep::kSync:
      return tmp.string() + ": fsync failed: " + reason;
    case WriteStep::kClose:
      return tmp.string() + ": close failed: " + reason;
    case WriteStep::kRename:
      return path.string() + ": cannot rename " + tmp.string() + " into place: " + reason;
    case WriteStep::kOpenDirectory:
      return directory.string() + ": cannot open directory for fsync: " + reason;
    case WriteStep::kSyncDirectory:
      return directory.string() + ": fsync failed: " + reason;
  }
  return path.string() + ": write failed: " + reason;
}

void throw_file_error(const WriteFailure& failure) { throw FileError(failure.message()); }

AtomicFileWriter::AtomicFileWriter(std::filesystem::path path, WriteErrorHandler on_error)
    : path_(std::move(path)),
      tmp_(path_.string() + ".tmp"),
      on_error_(on_error != nullptr ? on_error : throw_file_error) {
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail(WriteStep::kCreate, errno);
}

AtomicFileWriter::~AtomicFileWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!renamed_) {
    std::error_code ignored;
    std::filesystem::remove(tmp_, ignored);
  }
}

void AtomicFileWriter::fail(WriteStep step, int error) const {
  const WriteFailure failure{step, path_, tmp_, directory_of(path_), error};
  on_error_(failure);
  throw_file_error(failure);  // a handler that returned
}

void AtomicFileWriter::write(const void* data, size_t bytes) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::write(fd_, p, bytes);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail(WriteStep::kWrite, errno);
    }
    p += n;
    bytes -= static_cast<size_t>(n);
  }
}

void AtomicFileWriter::pwrite(const void* data, size_t bytes, uint64_t offset) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::pwrite(fd_, p, bytes, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      fail(WriteStep::kWrite, errno);
    }
    p += n;
    bytes -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

void AtomicFileWriter::commit() {
  if (::fsync(fd_) != 0) fail(WriteStep::kSync, errno);
  const int closed = ::close(fd_);
  fd_ = -1;
  if (closed != 0) fail(WriteStep::kClose, errno);
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) fail(WriteStep::kRename, errno);
  renamed_ = true;
  // The rename itself lives in the directory; without this a crash could forget it.
  const int dfd = ::open(directory_of(path_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) fail(WriteStep::kOpenDirectory, errno);
  const int synced = ::fsync(dfd);
  const int sync_error = errno;
  ::close(dfd);
  if (synced != 0) fail(WriteStep::kSyncDirectory, sync_error);
}

void write_file_atomically(const std::filesystem::path& path, std::string_view bytes,
                           WriteErrorHandler on_error) {
  AtomicFileWriter out(path, on_error);
  out.write(bytes);
  out.commit();
}

}  // namespace loopmoe::common
