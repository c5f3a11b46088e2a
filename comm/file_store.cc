#include "comm/file_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <thread>

#include "comm/comm_error.h"
#include "comm/store_util.h"

namespace loopmoe::comm {
namespace {

namespace fs = std::filesystem;

// Keys contain '/', which a file name cannot; percent-encode everything but [A-Za-z0-9_-]. Dots
// are encoded too so that no key can collide with the ".tmp." names of files being written.
std::string encode_key(const std::string& key) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string name;
  name.reserve(key.size() * 3);
  for (unsigned char c : key) {
    if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' ||
        c == '-') {
      name += static_cast<char>(c);
    } else {
      name += '%';
      name += kHex[c >> 4];
      name += kHex[c & 15];
    }
  }
  return name;
}

[[noreturn]] void fail(const std::string& what, const fs::path& path) {
  throw CommError("file store: " + what + " '" + path.string() + "': " + std::strerror(errno));
}

void write_all(int fd, const std::string& data, const fs::path& path) {
  size_t written = 0;
  while (written < data.size()) {
    ssize_t n = ::write(fd, data.data() + written, data.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail("cannot write", path);
    written += static_cast<size_t>(n);
  }
}

}  // namespace

FileStore::FileStore(std::filesystem::path directory) : directory_(std::move(directory)) {
  std::error_code error;
  fs::create_directories(directory_, error);
  if (error) {
    throw CommError("file store: cannot create directory '" + directory_.string() +
                    "': " + error.message());
  }
}

std::filesystem::path FileStore::path_for(const std::string& key) const {
  std::string name = encode_key(key);
  // NAME_MAX on the usual Linux file systems; the temporary name adds a prefix of its own.
  constexpr size_t kMaxName = 200;
  if (name.empty() || name.size() > kMaxName) {
    throw CommError("file store: key '" + key + "' is empty or too long to be a file name");
  }
  return directory_ / name;
}

void FileStore::set(const std::string& key, const std::string& value) {
  static std::atomic<uint64_t> counter{0};
  const fs::path path = path_for(key);
  // Unique per process and call, so concurrent writers of one key never share a temporary file.
  const fs::path tmp =
      directory_ / (".tmp." + std::to_string(::getpid()) + "." +
                    std::to_string(counter.fetch_add(1)) + "." + path.filename().string());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("cannot create", tmp);
  try {
    write_all(fd, value, tmp);
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  // No fsync: the store holds rendezvous data for live processes, which a crash invalidates
  // anyway; rename alone gives the atomic visibility readers need.
  if (::close(fd) != 0) fail("cannot close", tmp);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int saved = errno;
    ::unlink(tmp.c_str());
    errno = saved;
    fail("cannot rename into place", path);
  }
}

std::optional<std::string> FileStore::get(const std::string& key) {
  const fs::path path = path_for(key);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return std::nullopt;
    fail("cannot open", path);
  }
  std::string value;
  char buffer[4096];
  while (true) {
    ssize_t n = ::read(fd, buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int saved = errno;
      ::close(fd);
      errno = saved;
      fail("cannot read", path);
    }
    if (n == 0) break;
    value.append(buffer, static_cast<size_t>(n));
  }
  ::close(fd);
  return value;
}

void FileStore::wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::vector<fs::path> paths;
  for (const std::string& key : keys) paths.push_back(path_for(key));
  auto pause = std::chrono::milliseconds(1);
  while (true) {
    std::vector<std::string> missing;
    for (size_t i = 0; i < keys.size(); ++i) {
      std::error_code error;
      if (!fs::exists(paths[i], error)) missing.push_back(keys[i]);
    }
    if (missing.empty()) return;
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) {
      throw TimeoutError(internal::missing_keys_message("file store '" + directory_.string() + "'",
                                                        missing, timeout));
    }
    std::this_thread::sleep_for(
        std::min<std::chrono::steady_clock::duration>(pause, deadline - now));
    pause = std::min(pause * 2, std::chrono::milliseconds(20));
  }
}

}  // namespace loopmoe::comm
