// Tests for common/: atomic file writes, whole-file reads, elapsed seconds, run_main, process
// statistics from /proc.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>

#include "common/atomic_file.h"
#include "common/clock.h"
#include "common/process_stats.h"
#include "common/run_main.h"
#include "common/text_file.h"

namespace loopmoe::common {
namespace {

namespace fs = std::filesystem;

// A fresh directory per test, removed afterwards.
class TempDir {
 public:
  TempDir() {
    static int counter = 0;
    path_ = fs::temp_directory_path() /
            ("loopmoe_common_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  fs::path operator/(const std::string& name) const { return path_ / name; }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

void put(const fs::path& p, const std::string& text) {
  std::ofstream(p, std::ios::binary | std::ios::trunc) << text;
}

// Runs `f`, expecting it to throw E whose message contains every one of `parts`.
template <class E, class F>
void expect_throw_containing(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "no exception";
  } catch (const E& e) {
    for (const std::string& part : parts) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos)
          << "message '" << e.what() << "' lacks '" << part << "'";
    }
  }
}

TEST(AtomicFile, WritesContentAndRemovesTemporary) {
  TempDir dir;
  const fs::path p = dir / "out.bin";
  AtomicFileWriter out(p);
  EXPECT_EQ(out.tmp_path(), fs::path(p.string() + ".tmp"));
  EXPECT_TRUE(fs::exists(out.tmp_path()));
  EXPECT_FALSE(fs::exists(p));  // nothing under the real name before commit()
  out.write("hello ");
  const char rest[] = "world";
  out.write(rest, std::strlen(rest));
  out.pwrite("H", 1, 0);  // e.g. a header once its checksum is known
  out.commit();
  EXPECT_EQ(read_text(p), "Hello world");
  EXPECT_FALSE(fs::exists(p.string() + ".tmp"));
}

TEST(AtomicFile, ReplacesTheOldFile) {
  TempDir dir;
  const fs::path p = dir / "file.txt";
  put(p, "old content that is longer");
  write_file_atomically(p, "new");
  EXPECT_EQ(read_text(p), "new");
  EXPECT_FALSE(fs::exists(p.string() + ".tmp"));
  // A bare file name lands in the working directory; the directory fsync uses ".".
  const fs::path cwd = fs::current_path();
  fs::current_path(dir.path());
  write_file_atomically("bare.txt", "x");
  fs::current_path(cwd);
  EXPECT_EQ(read_text(dir / "bare.txt"), "x");
}

TEST(AtomicFile, WithoutCommitTheOldFileStaysAndTheTemporaryGoes) {
  TempDir dir;
  const fs::path p = dir / "file.txt";
  put(p, "old");
  {
    AtomicFileWriter out(p);
    out.write("half of the new conte");
    EXPECT_EQ(read_text(p), "old");  // readers see the old file meanwhile
  }
  EXPECT_EQ(read_text(p), "old");
  EXPECT_FALSE(fs::exists(p.string() + ".tmp"));
  // The same when an exception unwinds past the writer.
  try {
    AtomicFileWriter out(p);
    out.write("new");
    throw std::runtime_error("interrupted");
  } catch (const std::runtime_error&) {
  }
  EXPECT_EQ(read_text(p), "old");
  EXPECT_FALSE(fs::exists(p.string() + ".tmp"));
}

TEST(AtomicFile, MissingDirectoryIsAClearError) {
  TempDir dir;
  const fs::path p = dir / "no_such_dir" / "file.txt";
  expect_throw_containing<FileError>([&] { write_file_atomically(p, "x"); },
                                     {p.string() + ".tmp", "cannot create", "No such file"});
  EXPECT_FALSE(fs::exists(p.parent_path()));
}

TEST(AtomicFile, TargetThatIsADirectoryKeepsItAndRemovesTheTemporary) {
  TempDir dir;
  const fs::path p = dir / "taken";
  fs::create_directories(p);
  put(p / "inside.txt", "old");
  expect_throw_containing<FileError>([&] { write_file_atomically(p, "new"); },
                                     {p.string() + ": cannot rename", "into place", "directory"});
  EXPECT_TRUE(fs::is_directory(p));
  EXPECT_EQ(read_text(p / "inside.txt"), "old");
  EXPECT_FALSE(fs::exists(p.string() + ".tmp"));
}

// A handler gives the caller its own exception type and wording; the failure says which step.
struct CallerError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

TEST(AtomicFile, ErrorHandlerChoosesTheException) {
  TempDir dir;
  const fs::path p = dir / "missing" / "f";
  const auto handler = [](const WriteFailure& f) {
    EXPECT_EQ(f.step, WriteStep::kCreate);
    EXPECT_NE(f.error, 0);
    EXPECT_EQ(f.directory, f.path.parent_path());
    throw CallerError(f.tmp.string() + ": cannot create checkpoint file");
  };
  expect_throw_containing<CallerError>([&] { AtomicFileWriter out(p, handler); },
                                       {p.string() + ".tmp: cannot create checkpoint file"});
  // A handler that returns still ends in FileError with the default message.
  expect_throw_containing<FileError>(
      [&] { write_file_atomically(p, "x", [](const WriteFailure&) {}); }, {"cannot create"});
}

TEST(AtomicFile, DefaultMessagesNameTheFileAndTheReason) {
  WriteFailure f{WriteStep::kWrite, "d/f", "d/f.tmp", "d", ENOSPC};
  EXPECT_EQ(f.message(), "d/f.tmp: write failed: " + std::string(std::strerror(ENOSPC)));
  f.step = WriteStep::kRename;
  EXPECT_EQ(f.message(),
            "d/f: cannot rename d/f.tmp into place: " + std::string(std::strerror(ENOSPC)));
  f.step = WriteStep::kSyncDirectory;
  EXPECT_EQ(f.message(), "d: fsync failed: " + std::string(std::strerror(ENOSPC)));
}

TEST(TextFile, ReadsBytesAndNamesAMissingFile) {
  TempDir dir;
  const fs::path p = dir / "t.txt";
  const std::string bytes("a\0b\r\nc", 6);
  put(p, bytes);
  EXPECT_EQ(read_text(p), bytes);
  EXPECT_EQ(read_text_if_present(p), bytes);
  put(dir / "empty", "");
  EXPECT_EQ(read_text(dir / "empty"), "");

  const fs::path missing = dir / "missing.txt";
  EXPECT_EQ(read_text_if_present(missing), std::nullopt);
  expect_throw_containing<FileError>([&] { read_text(missing); },
                                     {missing.string() + ": cannot open: No such file"});
  expect_throw_containing<CallerError>([&] { read_text_as<CallerError>(missing); },
                                       {missing.string() + ": cannot open"});
}

TEST(Clock, SecondsSince) {
  const auto t0 = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const double s = seconds_since(t0);
  EXPECT_GE(s, 0.019);
  EXPECT_LT(s, 10.0);
  EXPECT_GE(seconds_since(std::chrono::system_clock::now() - std::chrono::seconds(2)), 2.0);
}

TEST(RunMain, ReturnsTheBodysCode) {
  testing::internal::CaptureStderr();
  EXPECT_EQ(run_main([] {}), 0);
  EXPECT_EQ(run_main([] { return 0; }), 0);
  EXPECT_EQ(run_main([] { return 106; }), 106);
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "");
}

TEST(RunMain, PrintsAnExceptionAsOneErrorLine) {
  testing::internal::CaptureStderr();
  EXPECT_EQ(run_main([]() -> int { throw std::runtime_error("x.toml: unknown key a.b"); }),
            kErrorExitCode);
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "error: x.toml: unknown key a.b\n");
  EXPECT_EQ(kErrorExitCode, 1);

  testing::internal::CaptureStderr();
  EXPECT_EQ(run_main([] { throw std::logic_error("boom"); }, ErrorLine::kOwnLine), 1);
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "\nerror: boom\n");
}

// ---- process statistics (suite names start with Common so that `ctest -R Common` runs them) ----

TEST(CommonProcessStats, ParsesStatWhoseCommandHoldsSpacesAndParentheses) {
  // Fields 1-24 of /proc/<pid>/stat, with a command name "a) (b c)" (up to 15 bytes, any bytes).
  const std::string stat =
      "4242 (a) (b c)) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 7 0 123456 "
      "987654321 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0\n";
  const std::optional<ProcStat> parsed = parse_proc_stat(stat);
  ASSERT_TRUE(parsed.has_value());
  EXPECT_EQ(parsed->utime_ticks, 250);
  EXPECT_EQ(parsed->stime_ticks, 75);
  EXPECT_EQ(parsed->num_threads, 7);
  EXPECT_EQ(parsed->start_ticks, 123456);
  EXPECT_EQ(parsed->vsize_bytes, 987654321);
  EXPECT_EQ(parsed->rss_pages, 2048);
}

TEST(CommonProcessStats, RejectsTruncatedOrMalformedStat) {
  EXPECT_FALSE(parse_proc_stat("").has_value());
  EXPECT_FALSE(parse_proc_stat("4242 (no closing parenthesis S 1 2 3").has_value());
  EXPECT_FALSE(
      parse_proc_stat("4242 (x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75").has_value());
  EXPECT_FALSE(parse_proc_stat("4242 (x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 2x0 75 0 0 20 0 7 0 "
                               "123456 987654321 2048")
                   .has_value());
}

TEST(CommonProcessStats, ParsesBootTime) {
  EXPECT_EQ(parse_boot_time("cpu  1 2 3\nintr 5 6\nbtime 1700000000\nprocesses 9\n"), 1700000000);
  EXPECT_EQ(parse_boot_time("btime 42"), 42);
  EXPECT_FALSE(parse_boot_time("cpu 1 2 3\nprocesses 9\n").has_value());
  EXPECT_FALSE(parse_boot_time("btimex 5\n").has_value());
}

TEST(CommonProcessStats, ReadsPlausibleValuesOfThisProcess) {
  const ProcessStats stats = read_process_stats();
  ASSERT_TRUE(stats.resident_memory_bytes && stats.virtual_memory_bytes && stats.cpu_seconds &&
              stats.threads && stats.start_time_seconds && stats.open_fds && stats.max_fds);
  EXPECT_GT(*stats.resident_memory_bytes, 0);
  EXPECT_GE(*stats.virtual_memory_bytes, *stats.resident_memory_bytes);
  EXPECT_GE(*stats.cpu_seconds, 0);
  EXPECT_GE(*stats.threads, 1);
  EXPECT_GE(*stats.open_fds, 3);  // at least stdin, stdout, stderr (and the directory's own)
  EXPECT_GE(*stats.max_fds, *stats.open_fds);
  const double now =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  // Started within the last hour (this test binary), not in the future; ticks are 10 ms.
  EXPECT_LE(*stats.start_time_seconds, now + 1);
  EXPECT_GT(*stats.start_time_seconds, now - 3600);
}

TEST(CommonProcessStats, OpenFdsFollowOpenAndClose) {
  TempDir dir;
  put(dir / "f", "x");
  const double before = *read_process_stats().open_fds;
  const int fd = ::open((dir / "f").c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  const double opened = *read_process_stats().open_fds;
  ::close(fd);
  const double closed = *read_process_stats().open_fds;
  EXPECT_EQ(opened, before + 1);
  EXPECT_EQ(closed, before);
}

TEST(CommonProcessStats, CpuSecondsGrowWithBusyWork) {
  const double before = *read_process_stats().cpu_seconds;
  // Burn 0.2 s of CPU (std::clock is this process's CPU time).
  const std::clock_t start = std::clock();
  volatile double sink = 0;
  while (std::clock() - start < CLOCKS_PER_SEC / 5) sink = sink + 1.0;
  const double after = *read_process_stats().cpu_seconds;
  EXPECT_GE(after, before + 0.1);
  EXPECT_LT(after, before + 60);
}

TEST(CommonProcessStats, ThreadsCountAnExtraThread) {
  const double before = *read_process_stats().threads;
  std::mutex mutex;
  std::condition_variable cv;
  bool started = false, stop = false;
  std::thread thread([&] {
    std::unique_lock lock(mutex);
    started = true;
    cv.notify_all();
    cv.wait(lock, [&] { return stop; });
  });
  {
    std::unique_lock lock(mutex);
    cv.wait(lock, [&] { return started; });
  }
  const double during = *read_process_stats().threads;
  {
    std::lock_guard lock(mutex);
    stop = true;
  }
  cv.notify_all();
  thread.join();
  EXPECT_EQ(during, before + 1);
}

TEST(CommonProcessStats, SamplesHaveTheStandardNamesAndLeaveOutMissingValues) {
  ProcessStats stats;
  stats.cpu_seconds = 1.5;
  stats.resident_memory_bytes = 4096;
  stats.virtual_memory_bytes = 8192;
  stats.open_fds = 5;
  stats.max_fds = 1024;
  stats.start_time_seconds = 1700000000;
  stats.threads = 3;
  std::map<std::string, std::pair<bool, double>> by_name;
  for (const ProcessSample& s : process_samples(stats)) {
    EXPECT_TRUE(by_name.emplace(s.name, std::pair(s.counter, s.value)).second) << s.name;
    EXPECT_NE(std::string(s.help), "") << s.name;
  }
  const std::map<std::string, std::pair<bool, double>> expected = {
      {"process_cpu_seconds_total", {true, 1.5}},
      {"process_resident_memory_bytes", {false, 4096}},
      {"process_virtual_memory_bytes", {false, 8192}},
      {"process_open_fds", {false, 5}},
      {"process_max_fds", {false, 1024}},
      {"process_start_time_seconds", {false, 1700000000}},
      {"process_threads", {false, 3}}};
  EXPECT_EQ(by_name, expected);

  stats.open_fds.reset();
  stats.cpu_seconds.reset();
  std::set<std::string> names;
  for (const ProcessSample& s : process_samples(stats)) names.insert(s.name);
  EXPECT_EQ(names.count("process_open_fds"), 0u);
  EXPECT_EQ(names.count("process_cpu_seconds_total"), 0u);
  EXPECT_EQ(names.size(), 5u);
}

}  // namespace
}  // namespace loopmoe::common
