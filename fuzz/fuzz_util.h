// Helpers shared by the fuzz targets (docs/FUZZING.md): a per-process scratch directory for the
// parsers that read files, a check that aborts with a message (a finding, like a sanitizer report),
// and little-endian field access for the targets that repair checksums.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>

namespace loopmoe::fuzz {

// A directory of this process's own (mkdtemp under $TMPDIR or /tmp), created on first use and
// removed at exit, so parallel fuzzers never share files.
const std::filesystem::path& scratch_dir();

// Writes `bytes` to scratch_dir()/name (replacing it) and returns the path.
std::filesystem::path write_scratch(const std::string& name, std::string_view bytes);

// Prints "fuzz check failed: what" (and `detail`, escaped, when given) and aborts, so libFuzzer
// records the input as a crash.
[[noreturn]] void fail(const std::string& what, std::string_view detail = {});

inline void check(bool ok, const std::string& what, std::string_view detail = {}) {
  if (!ok) fail(what, detail);
}

inline std::string_view as_text(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

template <typename T>
T load_le(std::string_view bytes, size_t at) {
  T v;
  std::memcpy(&v, bytes.data() + at, sizeof v);
  return v;
}

template <typename T>
void store_le(std::string& bytes, size_t at, T v) {
  std::memcpy(bytes.data() + at, &v, sizeof v);
}

// XXH64 (seed 0) of bytes [begin, end) of `bytes`; end is clamped to the size.
uint64_t xxh64(std::string_view bytes, size_t begin, size_t end = std::string_view::npos);

}  // namespace loopmoe::fuzz
