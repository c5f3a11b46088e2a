#include "fuzz/fuzz_util.h"

#include <sanitizer/common_interface_defs.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <system_error>
#include <vector>

namespace loopmoe::fuzz {
namespace {

std::filesystem::path make_scratch_dir() {
  const char* tmp = std::getenv("TMPDIR");
  std::string pattern =
      std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/loopmoe-fuzz-XXXXXX";
  std::vector<char> buf(pattern.begin(), pattern.end());
  buf.push_back('\0');
  if (::mkdtemp(buf.data()) == nullptr) fail("cannot create a scratch directory", pattern);
  return std::filesystem::path(buf.data());
}

}  // namespace

const std::filesystem::path& scratch_dir() {
  static const std::filesystem::path dir = [] {
    std::filesystem::path d = make_scratch_dir();
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(scratch_dir(), ec);
    });
    return d;
  }();
  return dir;
}

std::filesystem::path write_scratch(const std::string& name, std::string_view bytes) {
  std::filesystem::path path = scratch_dir() / name;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) fail("cannot write " + path.string());
  return path;
}

void fail(const std::string& what, std::string_view detail) {
  std::fprintf(stderr, "fuzz check failed: %s\n", what.c_str());
  if (!detail.empty()) {
    std::string escaped;
    for (unsigned char c : detail.substr(0, 4096)) {
      if (c == '\n' || (c >= 0x20 && c < 0x7f && c != '\\')) {
        escaped += static_cast<char>(c);
      } else {
        char hex[8];
        std::snprintf(hex, sizeof hex, "\\x%02x", c);
        escaped += hex;
      }
    }
    std::fprintf(stderr, "--- detail ---\n%s\n--------------\n", escaped.c_str());
  }
  std::fflush(stderr);
  // Also through the sanitizers' report descriptor: under -close_fd_mask=2 (scripts/fuzz.sh)
  // libFuzzer keeps that one while the target's own stderr is discarded.
  __sanitizer_report_error_summary(("fuzz check failed: " + what).c_str());
  std::abort();
}

uint64_t xxh64(std::string_view bytes, size_t begin, size_t end) {
  end = std::min(end, bytes.size());
  if (begin >= end) return XXH64(nullptr, 0, 0);
  return XXH64(bytes.data() + begin, end - begin, 0);
}

}  // namespace loopmoe::fuzz
