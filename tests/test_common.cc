// Tests for common/: atomic file writes, whole-file reads, elapsed seconds, run_main.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <thread>

#include "common/atomic_file.h"
#include "common/clock.h"
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

}  // namespace
}  // namespace loopmoe::common
