// Process statistics from /proc/self (process_stats.h). The series names and help texts are those
// of the process collector of the Prometheus client libraries (client_golang, client_rust), so
// that the usual dashboards and rules work unchanged.
#include "common/process_stats.h"

#include <dirent.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <limits>
#include <string>

#include "common/file_error.h"
#include "common/text_file.h"

namespace loopmoe::common {
namespace {

std::optional<std::string> read_proc_file(const char* path) {
  try {
    return read_text_if_present(path);
  } catch (const FileError&) {
    return std::nullopt;
  }
}

std::optional<double> to_number(std::string_view token) {
  int64_t value = 0;
  const auto [end, error] = std::from_chars(token.data(), token.data() + token.size(), value);
  if (error != std::errc() || end != token.data() + token.size()) return std::nullopt;
  return static_cast<double>(value);
}

std::optional<double> count_open_fds() {
  DIR* dir = opendir("/proc/self/fd");
  if (!dir) return std::nullopt;
  // Counts the descriptor of `dir` itself too, as the other clients' collectors do.
  double count = 0;
  while (const dirent* entry = readdir(dir)) {
    const std::string_view name = entry->d_name;
    if (name != "." && name != "..") ++count;
  }
  closedir(dir);
  return count;
}

std::optional<double> fd_limit() {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return std::nullopt;
  if (limit.rlim_cur == RLIM_INFINITY) return std::numeric_limits<double>::infinity();
  return static_cast<double>(limit.rlim_cur);
}

}  // namespace

std::optional<ProcStat> parse_proc_stat(std::string_view text) {
  const size_t close = text.rfind(')');
  if (close == std::string_view::npos) return std::nullopt;
  // Fields 3 (state) onwards, separated by spaces; field n is fields[n - 3].
  std::vector<std::string_view> fields;
  std::string_view rest = text.substr(close + 1);
  while (fields.size() < 22) {
    const size_t start = rest.find_first_not_of(" \n");
    if (start == std::string_view::npos) break;
    rest.remove_prefix(start);
    const size_t end = std::min(rest.find_first_of(" \n"), rest.size());
    fields.push_back(rest.substr(0, end));
    rest.remove_prefix(end);
  }
  if (fields.size() < 22) return std::nullopt;  // rss is field 24
  auto field = [&](int n) { return to_number(fields[static_cast<size_t>(n - 3)]); };
  const auto utime = field(14), stime = field(15), threads = field(20), start = field(22),
             vsize = field(23), rss = field(24);
  if (!utime || !stime || !threads || !start || !vsize || !rss) return std::nullopt;
  return ProcStat{.utime_ticks = *utime,
                  .stime_ticks = *stime,
                  .num_threads = *threads,
                  .start_ticks = *start,
                  .vsize_bytes = *vsize,
                  .rss_pages = *rss};
}

std::optional<double> parse_boot_time(std::string_view proc_stat_text) {
  size_t line_start = 0;
  while (line_start < proc_stat_text.size()) {
    size_t line_end = proc_stat_text.find('\n', line_start);
    if (line_end == std::string_view::npos) line_end = proc_stat_text.size();
    std::string_view line = proc_stat_text.substr(line_start, line_end - line_start);
    if (line.starts_with("btime ")) {
      line.remove_prefix(6);
      while (!line.empty() && line.front() == ' ') line.remove_prefix(1);
      while (!line.empty() && (line.back() == ' ' || line.back() == '\r')) line.remove_suffix(1);
      return to_number(line);
    }
    line_start = line_end + 1;
  }
  return std::nullopt;
}

ProcessStats read_process_stats() {
  ProcessStats stats;
  const long ticks = sysconf(_SC_CLK_TCK);
  const long page_size = sysconf(_SC_PAGESIZE);
  std::optional<ProcStat> stat;
  if (const auto text = read_proc_file("/proc/self/stat")) stat = parse_proc_stat(*text);
  if (stat) {
    if (ticks > 0) {
      stats.cpu_seconds = (stat->utime_ticks + stat->stime_ticks) / static_cast<double>(ticks);
    }
    if (page_size > 0)
      stats.resident_memory_bytes = stat->rss_pages * static_cast<double>(page_size);
    stats.virtual_memory_bytes = stat->vsize_bytes;
    stats.threads = stat->num_threads;
    if (ticks > 0) {
      std::optional<double> boot_time;
      if (const auto text = read_proc_file("/proc/stat")) boot_time = parse_boot_time(*text);
      if (boot_time) {
        stats.start_time_seconds = *boot_time + stat->start_ticks / static_cast<double>(ticks);
      }
    }
  }
  stats.open_fds = count_open_fds();
  stats.max_fds = fd_limit();
  return stats;
}

std::vector<ProcessSample> process_samples(const ProcessStats& stats) {
  std::vector<ProcessSample> samples;
  auto add = [&](const char* name, const char* help, bool counter,
                 const std::optional<double>& value) {
    if (value) samples.push_back({name, help, counter, *value});
  };
  add("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", true,
      stats.cpu_seconds);
  add("process_open_fds", "Number of open file descriptors.", false, stats.open_fds);
  add("process_max_fds", "Maximum number of open file descriptors.", false, stats.max_fds);
  add("process_virtual_memory_bytes", "Virtual memory size in bytes.", false,
      stats.virtual_memory_bytes);
  add("process_resident_memory_bytes", "Resident memory size in bytes.", false,
      stats.resident_memory_bytes);
  add("process_start_time_seconds", "Start time of the process since unix epoch in seconds.", false,
      stats.start_time_seconds);
  add("process_threads", "Number of OS threads in the process.", false, stats.threads);
  return samples;
}

}  // namespace loopmoe::common
