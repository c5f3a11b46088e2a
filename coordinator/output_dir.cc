#include "coordinator/output_dir.h"

#include <filesystem>
#include <stdexcept>
#include <system_error>

namespace loopmoe::coordinator {
namespace {

namespace fs = std::filesystem;

fs::path resolve(const fs::path& path) {
  std::error_code ec;
  fs::path resolved = fs::weakly_canonical(path, ec);
  if (ec) {
    throw std::invalid_argument(path.string() + ": cannot resolve (" + ec.message() + ")");
  }
  return resolved.lexically_normal();
}

}  // namespace

std::string confine_output_dir(const std::string& output_dir, const std::string& data_root) {
  if (data_root.empty()) throw std::invalid_argument("no data root configured");
  const fs::path root = resolve(fs::absolute(data_root));
  const fs::path given(output_dir);
  const fs::path dir = resolve(given.is_absolute() ? given : root / given);
  // Component-wise prefix: /data/root2 is not under /data/root.
  auto r = root.begin();
  auto d = dir.begin();
  for (; r != root.end(); ++r, ++d) {
    if (r->empty() && std::next(r) == root.end()) break;  // a trailing separator
    if (d == dir.end() || *r != *d) {
      throw std::invalid_argument(output_dir + " (resolved " + dir.string() +
                                  ") is outside the coordinator's data root " + root.string());
    }
  }
  return dir.string();
}

}  // namespace loopmoe::coordinator
