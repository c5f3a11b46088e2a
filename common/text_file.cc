// Whole-file reads (text_file.h).
#include "common/text_file.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

namespace loopmoe::common {
namespace {

std::string read_open(std::ifstream& in, const std::filesystem::path& path) {
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw FileError(path.string() + ": read failed");
  return std::move(ss).str();
}

}  // namespace

std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError(path.string() + ": cannot open: " + std::strerror(errno));
  return read_open(in, path);
}

std::optional<std::string> read_text_if_present(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  return read_open(in, path);
}

}  // namespace loopmoe::common
