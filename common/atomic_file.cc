// Durable atomic file writes (atomic_file.h): temporary file, fsync, rename, directory fsync.
#include "common/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <system_error>
#include <utility>

namespace loopmoe::common {
namespace {

std::filesystem::path directory_of(const std::filesystem::path& path) {
  std::filesystem::path dir = path.parent_path();
  return dir.empty() ? std::filesystem::path(".") : dir;
}

// The fault-injection hook (atomic_file.h). `armed` is the only thing an unarmed commit() reads;
// the rest sits behind the mutex (tests may commit from several threads).
struct FaultState {
  std::atomic<bool> armed{false};
  std::once_flag env_read;
  std::mutex mu;
  FaultInjection injection;  // guarded by mu
  int hits = 0;              // guarded by mu: commits that reached injection.point
};

FaultState& fault_state() {
  static FaultState state;
  return state;
}

void read_fault_environment() {
  FaultState& s = fault_state();
  std::call_once(s.env_read, [&] {
    const char* text = std::getenv("LOOPMOE_FAULT_INJECT");
    if (text == nullptr || *text == '\0') return;
    FaultInjection injection;
    try {
      injection = parse_fault_injection(text);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(std::string("LOOPMOE_FAULT_INJECT: ") + e.what());
    }
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.armed.load()) return;  // set_fault_injection came first and wins
    s.injection = std::move(injection);
    s.hits = 0;
    s.armed.store(s.injection.point != FaultPoint::kNone);
  });
}

// Dies here if the hook is armed for this point, this target and this occurrence.
void maybe_fault(FaultPoint point, const std::filesystem::path& target) {
  FaultState& s = fault_state();
  if (!s.armed.load(std::memory_order_relaxed)) return;
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.injection.point != point) return;
  if (!s.injection.file_name.empty() && target.filename() != s.injection.file_name) return;
  if (++s.hits != s.injection.nth) return;
  ::kill(::getpid(), SIGKILL);
  ::_exit(137);  // not reached
}

}  // namespace

FaultInjection parse_fault_injection(std::string_view text) {
  FaultInjection f;
  const size_t colon = text.find(':');
  const std::string_view point = text.substr(0, colon);
  if (point == "after-write") {
    f.point = FaultPoint::kAfterWrite;
  } else if (point == "after-fsync") {
    f.point = FaultPoint::kAfterFsync;
  } else if (point == "before-rename") {
    f.point = FaultPoint::kBeforeRename;
  } else if (point == "after-rename") {
    f.point = FaultPoint::kAfterRename;
  } else {
    throw std::invalid_argument("unknown fault point '" + std::string(point) +
                                "' (after-write, after-fsync, before-rename, after-rename)");
  }
  if (colon == std::string_view::npos) return f;
  std::string_view rest = text.substr(colon + 1);
  const size_t colon2 = rest.find(':');
  const std::string nth(rest.substr(0, colon2));
  size_t used = 0;
  int value = 0;
  try {
    value = std::stoi(nth, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (nth.empty() || used != nth.size() || value < 1) {
    throw std::invalid_argument("occurrence '" + nth + "' is not a positive integer");
  }
  f.nth = value;
  if (colon2 != std::string_view::npos) f.file_name = std::string(rest.substr(colon2 + 1));
  return f;
}

void set_fault_injection(const FaultInjection& injection) {
  FaultState& s = fault_state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.injection = injection;
  s.hits = 0;
  s.armed.store(injection.point != FaultPoint::kNone);
}

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
  read_fault_environment();
  maybe_fault(FaultPoint::kAfterWrite, path_);
  if (::fsync(fd_) != 0) fail(WriteStep::kSync, errno);
  maybe_fault(FaultPoint::kAfterFsync, path_);
  const int closed = ::close(fd_);
  fd_ = -1;
  if (closed != 0) fail(WriteStep::kClose, errno);
  maybe_fault(FaultPoint::kBeforeRename, path_);
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) fail(WriteStep::kRename, errno);
  renamed_ = true;
  maybe_fault(FaultPoint::kAfterRename, path_);
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
