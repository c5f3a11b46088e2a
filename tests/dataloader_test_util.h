// Shared helpers of the dataloader/ tests (test_token_shard.cc, test_dataset_check.cc,
// test_prepare.cc, test_prepare_split.cc, test_sampler.cc): a temporary directory, file helpers,
// the DataError expectation and a small deterministic corpus for `data prepare`.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <vector>

#include "dataloader/data_error.h"
#include "dataloader/prepare.h"

namespace loopmoe::dataloader::test_util {

namespace fs = std::filesystem;

// A fresh directory per test, removed afterwards.
class TempDir {
 public:
  TempDir() {
    static int counter = 0;
    path_ = fs::temp_directory_path() / ("loopmoe_dataloader_test_" + std::to_string(::getpid()) +
                                         "_" + std::to_string(counter++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

inline std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

inline void spit(const fs::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << s;
}

// Expects `fn` to throw DataError whose message names `file` and contains `what`.
inline void expect_error(const std::function<void()>& fn, const fs::path& file,
                         const std::string& what) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one naming " << file << " with \"" << what << "\"";
  } catch (const DataError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(file.string()), std::string::npos) << "message: " << msg;
    EXPECT_NE(msg.find(what), std::string::npos) << "message: " << msg;
  }
}

// A small corpus of deterministic pseudo-English: enough repeated structure for a few hundred BPE
// pieces.
inline std::string make_text(int seed, int words) {
  static const char* kWords[] = {
      "the",     "nation",  "people",   "congress", "shall",  "report", "union",   "state",
      "economy", "of",      "and",      "to",       "we",     "our",    "peace",   "year",
      "work",    "future",  "American", "freedom",  "will",   "must",   "budget",  "law",
      "citizen", "justice", "strength", "progress", "world",  "duty",   "Senate",  "House",
      "health",  "school",  "trade",    "war",      "energy", "jobs",   "history", "hope"};
  std::string s;
  uint64_t x = static_cast<uint64_t>(seed) * 2654435761u + 17;
  for (int i = 0; i < words; ++i) {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    s += kWords[(x >> 33) % std::size(kWords)];
    s += (i % 11 == 10) ? ".\n" : (i % 7 == 6) ? ", " : " ";
  }
  return s + "Total: " + std::to_string(seed * 1000 + 42) + " (é, ü)\n";
}

inline std::vector<fs::path> write_corpus(const fs::path& dir, int files) {
  fs::create_directories(dir);
  std::vector<fs::path> out;
  for (int i = 0; i < files; ++i) {
    out.push_back(dir / ("doc_" + std::to_string(i) + ".txt"));
    spit(out.back(), make_text(i, 300));
  }
  return out;
}

// Byte fallback (256) + unk/bos/eos + ~55 distinct characters + a few merges.
inline constexpr int kTinyVocab = 320;

inline PrepareOptions tiny_options(const fs::path& input, const fs::path& out) {
  PrepareOptions o;
  o.inputs = {input};
  o.out_dir = out;
  o.vocab_size = kTinyVocab;
  o.val_fraction = 0.2;
  o.seed = 7;
  return o;
}

inline std::string normalize_ws(const std::string& s) {
  std::string out;
  bool space = false;
  for (char c : s) {
    if (c == ' ' || c == '\n' || c == '\t' || c == '\r') {
      space = !out.empty();
    } else {
      if (space) out += ' ';
      space = false;
      out += c;
    }
  }
  return out;
}

}  // namespace loopmoe::dataloader::test_util
