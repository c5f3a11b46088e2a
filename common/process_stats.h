// CPU, memory, threads and file descriptors of this process, read from /proc/self (Linux), for the
// standard process metrics of the Prometheus client libraries (process_cpu_seconds_total, ...).
// The reading lives here once; coordinator/metrics.cc and process/process_metrics.cc turn
// process_samples() into prometheus-cpp families at scrape time. No state: thread-safe.
#pragma once

#include <optional>
#include <string_view>
#include <vector>

namespace loopmoe::common {

// Each field is nullopt when its source cannot be read or parsed (not Linux, /proc not mounted),
// so one unreadable file does not hide the others.
struct ProcessStats {
  std::optional<double> cpu_seconds;            // user + system, /proc/self/stat utime + stime
  std::optional<double> resident_memory_bytes;  // /proc/self/stat rss * page size
  std::optional<double> virtual_memory_bytes;   // /proc/self/stat vsize
  std::optional<double> threads;                // /proc/self/stat num_threads
  std::optional<double> start_time_seconds;     // since the Unix epoch: btime + starttime
  std::optional<double> open_fds;               // entries of /proc/self/fd
  std::optional<double> max_fds;                // soft RLIMIT_NOFILE (+Inf when unlimited)
};

ProcessStats read_process_stats();

// One series of the Prometheus process collector: `name` is the exported metric name.
struct ProcessSample {
  const char* name;
  const char* help;
  bool counter;  // else a gauge
  double value;
};

// The process_* series of `stats`, in a fixed order, leaving out the fields that are nullopt.
std::vector<ProcessSample> process_samples(const ProcessStats& stats);

// The fields of /proc/<pid>/stat that ProcessStats needs, in the kernel's units.
struct ProcStat {
  double utime_ticks = 0;
  double stime_ticks = 0;
  double num_threads = 0;
  double start_ticks = 0;  // clock ticks after boot
  double vsize_bytes = 0;
  double rss_pages = 0;
};

// Parses the text of /proc/<pid>/stat. The command name (field 2) is in parentheses and may hold
// spaces and parentheses itself, so the fields are counted from its last ')'. nullopt if the text
// is cut short or a needed field is not a number.
std::optional<ProcStat> parse_proc_stat(std::string_view text);

// The "btime" line of /proc/stat: boot time in seconds since the Unix epoch.
std::optional<double> parse_boot_time(std::string_view proc_stat_text);

}  // namespace loopmoe::common
