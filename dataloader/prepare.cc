// `data prepare` (prepare.h): read the inputs, split them (split.cc), train or load the tokenizer,
// encode, and write the shards and meta.json.
#include "dataloader/prepare.h"

#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <ostream>
#include <sstream>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>

#include "common/atomic_file.h"
#include "common/clock.h"
#include "common/text_file.h"
#include "dataloader/file_util.h"
#include "dataloader/split.h"
#include "dataloader/tokenizer.h"

namespace loopmoe::dataloader {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using split_internal::apply_fallbacks;
using split_internal::Doc;
using split_internal::Source;
using split_internal::split_domain;

std::vector<fs::path> expand_inputs(const std::vector<fs::path>& inputs) {
  if (inputs.empty()) throw DataError("data prepare: no input files given (--input)");
  std::vector<fs::path> files;
  for (const fs::path& in : inputs) {
    std::error_code ec;
    const fs::file_status st = fs::status(in, ec);
    if (ec || !fs::exists(st)) throw DataError(in.string() + ": no such file or directory");
    if (fs::is_directory(st)) {
      size_t found = 0;
      for (const fs::directory_entry& e : fs::directory_iterator(in)) {
        if (e.is_regular_file() && e.path().extension() == ".txt") {
          files.push_back(e.path());
          ++found;
        }
      }
      if (found == 0) throw DataError(in.string() + ": directory holds no *.txt files");
    } else if (fs::is_regular_file(st)) {
      files.push_back(in);
    } else {
      throw DataError(in.string() + ": not a regular file or directory");
    }
  }
  std::sort(files.begin(), files.end());
  files.erase(std::unique(files.begin(), files.end()), files.end());
  return files;
}

// Sentencepiece assumes UTF-8; reject anything else here, where we can still name the file.
void check_utf8(const fs::path& path, std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t len = c < 0x80           ? 1
                 : (c >> 5) == 0x6  ? 2
                 : (c >> 4) == 0xE  ? 3
                 : (c >> 3) == 0x1E ? 4
                                    : 0;
    bool ok = len != 0 && i + len <= s.size();
    for (size_t k = 1; ok && k < len; ++k) {
      ok = (static_cast<unsigned char>(s[i + k]) & 0xC0) == 0x80;
    }
    if (!ok) throw DataError(path.string() + ": not valid UTF-8 at byte " + std::to_string(i));
    i += len;
  }
}

bool blank(std::string_view s) {
  return s.find_first_not_of(" \t\r\n\f\v") == std::string_view::npos;
}

std::string json_string(std::string_view s) {
  std::string out = "\"";
  for (char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += ch;
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += ch;
    }
  }
  return out + "\"";
}

std::string json_double(double v) {
  char buf[32];
  const auto res = std::to_chars(buf, buf + sizeof buf, v);  // shortest round-trip form
  return std::string(buf, res.ptr);
}

std::string hex64(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string mb(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MB", static_cast<double>(bytes) / 1e6);
  return buf;
}

// A domain of the corpus: the input files of one directory (docs/DATA.md "Domains"). Its
// documents are contiguous in both shards, so its validation documents are one range of val.bin.
struct Domain {
  std::string name;  // the directory's base name (its path if two share a base name)
  std::string key;   // the directory's lexically normal absolute path
  uint64_t files = 0, bytes = 0;
  uint64_t train_docs = 0, val_docs = 0, train_tokens = 0, val_tokens = 0;
  uint64_t val_doc_begin = 0, val_token_begin = 0;  // the domain's range in val.bin
};

// The directory holding `file`, as domains are keyed (its lexically normal absolute path).
std::string domain_key(const fs::path& file) {
  return fs::absolute(file).lexically_normal().parent_path().string();
}

// Runs fn(i) for i in [0, n) on `threads` threads (each i once, any order).
void parallel_for(int threads, size_t n, const std::function<void(size_t)>& fn) {
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < n;) {
      try {
        fn(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        next = n;
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (std::thread& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace

PrepareResult prepare_dataset(const PrepareOptions& options) {
  const Clock::time_point start = Clock::now();
  std::ostream* log = options.log;
  std::mutex log_mutex;
  auto say = [&](const std::string& line) {
    std::lock_guard<std::mutex> lock(log_mutex);
    if (log != nullptr) *log << "data prepare: " << line << std::endl;
  };
  PrepareResult result;

  if (options.out_dir.empty()) throw DataError("data prepare: no output directory given (--out)");
  if (!(options.val_fraction > 0.0 && options.val_fraction < 1.0)) {
    throw DataError("data prepare: --val-fraction must lie in (0, 1), got " +
                    json_double(options.val_fraction));
  }
  if (options.tokenizer_model.empty() && options.vocab_size < kMinVocabSize) {
    throw DataError("data prepare: --vocab " + std::to_string(options.vocab_size) +
                    " is too small for a sentencepiece BPE model with byte fallback (needs >= " +
                    std::to_string(kMinVocabSize) + ", plus one per distinct character)");
  }
  if (options.threads < 0) {
    throw DataError("data prepare: --threads must be 0 (all cores) or positive, got " +
                    std::to_string(options.threads));
  }
  const int threads = options.threads > 0
                          ? options.threads
                          : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));

  // 1. Read every input; documents are views into the file contents kept in `sources`. A
  // domain is the set of files of one directory; the files are grouped by domain, in the order
  // the sorted paths first reach each directory (for files of one directory: sorted order).
  std::vector<std::pair<fs::path, size_t>> files;  // (file, its domain), grouped by domain
  std::vector<Domain> domains;
  {
    std::map<std::string, size_t> index;
    for (fs::path& f : expand_inputs(options.inputs)) {
      const auto [it, added] = index.emplace(domain_key(f), domains.size());
      if (added) domains.push_back({fs::path(it->first).filename().string(), it->first});
      files.emplace_back(std::move(f), it->second);
    }
    std::stable_sort(files.begin(), files.end(),
                     [](const auto& a, const auto& b) { return a.second < b.second; });
    // Names are the directories' base names, unless two share one: then their paths.
    std::map<std::string, int> uses;
    for (const Domain& d : domains) ++uses[d.name];
    for (Domain& d : domains) {
      if (d.name.empty() || uses[d.name] > 1) d.name = d.key;
    }
  }
  std::vector<Source> sources;
  sources.reserve(files.size());
  for (const auto& [f, domain] : files) {
    Source s;
    s.path = f;
    s.name = f.filename().string();
    s.domain = domain;
    s.text = common::read_text_as<DataError>(f);
    check_utf8(f, s.text);
    if (blank(s.text)) throw DataError(f.string() + ": empty file (no text)");
    result.input_bytes += s.text.size();
    domains[s.domain].files += 1;
    domains[s.domain].bytes += s.text.size();
    sources.push_back(std::move(s));
  }
  result.num_files = sources.size();

  std::vector<std::vector<Doc>> domain_docs(domains.size());
  size_t num_docs = 0;
  for (size_t si = 0; si < sources.size(); ++si) {
    std::vector<Doc>& out = domain_docs[sources[si].domain];
    std::string_view text = sources[si].text;
    if (!options.docs_per_line) {
      out.push_back({si, 0, -1, text, 0.0, false});
      ++num_docs;
      continue;
    }
    uint64_t index = 0;
    while (!text.empty()) {
      const size_t nl = text.find('\n');
      const std::string_view line = text.substr(0, nl);
      text = nl == std::string_view::npos ? std::string_view() : text.substr(nl + 1);
      if (!blank(line)) {
        out.push_back({si, index++, -1, line, 0.0, false});
        ++num_docs;
      }
    }
  }
  say("read " + std::to_string(sources.size()) + " files (" + mb(result.input_bytes) + "), " +
      std::to_string(num_docs) + " documents" +
      (domains.size() > 1 ? " in " + std::to_string(domains.size()) + " domains (directories)"
                          : ""));

  // 2. Split each domain by document (stratified: every domain gets its own fallbacks and
  // chunking, so each one that can be split has text on both sides), then concatenate.
  std::vector<Doc> docs;
  size_t num_val = 0;
  for (size_t di = 0; di < domains.size(); ++di) {
    std::vector<Doc>& dd = domain_docs[di];
    const std::string label = domains.size() > 1 ? "domain " + domains[di].name + ": " : "";
    num_val += split_domain(dd, sources, options.seed, options.val_fraction, label, result, say);
    docs.insert(docs.end(), dd.begin(), dd.end());
  }
  domain_docs.clear();
  // Across domains, one-unit domains follow the plain rule; the fallbacks then apply to the
  // whole corpus, exactly as for one domain.
  num_val = apply_fallbacks(docs, num_val);
  const std::string fraction = json_double(options.val_fraction);
  if (num_val == 0 || num_val == docs.size()) {
    // One unit only (with two, the fallbacks fill both sides): a single document too short to
    // cut, or cut into one non-blank piece.
    const Doc& d = docs.front();
    throw DataError(sources[d.source].path.string() +
                    ": too little text for a train/validation split: the corpus is one " +
                    (options.docs_per_line ? "line" : "document") + " of " +
                    std::to_string(d.text.size()) + " bytes, and only documents over " +
                    std::to_string(kChunkBytes) +
                    " bytes are cut into chunks (give more text, or more files)");
  }
  say("split: " + std::to_string(docs.size() - num_val) + " train / " + std::to_string(num_val) +
      (result.chunked_docs > 0 ? " val documents and chunks" : " val documents") +
      " (val fraction " + fraction + ", seed " + std::to_string(options.seed) + ")");

  // 3. Tokenizer: trained on the train split only, so validation text never shapes the vocabulary.
  Clock::time_point t = Clock::now();
  Tokenizer tokenizer = [&] {
    if (!options.tokenizer_model.empty()) {
      say("loading tokenizer " + options.tokenizer_model.string());
      return Tokenizer::load(options.tokenizer_model);
    }
    std::vector<std::string_view> train_text;
    uint64_t train_bytes = 0;
    for (const Doc& d : docs) {
      if (!d.val) {
        train_text.push_back(d.text);
        train_bytes += d.text.size();
      }
    }
    say("training BPE tokenizer: vocab " + std::to_string(options.vocab_size) + " on " +
        std::to_string(train_text.size()) + " train documents (" + mb(train_bytes) + ")");
    TokenizerTrainOptions topt;
    topt.vocab_size = options.vocab_size;
    topt.seed = static_cast<uint32_t>(options.seed);
    return Tokenizer::train(train_text, topt);
  }();
  result.tokenizer_seconds = common::seconds_since(t);
  result.vocab_size = static_cast<uint32_t>(tokenizer.vocab_size());
  if (!options.tokenizer_model.empty() && options.vocab_size > 0 &&
      static_cast<uint32_t>(options.vocab_size) != result.vocab_size) {
    throw DataError(options.tokenizer_model.string() + ": model has vocab " +
                    std::to_string(result.vocab_size) + " but --vocab " +
                    std::to_string(options.vocab_size) + " was given");
  }
  say("tokenizer ready: vocab " + std::to_string(result.vocab_size) + " in " +
      json_double(std::round(result.tokenizer_seconds * 100) / 100) + " s");

  // 4. Encode on `threads` threads, each document on its own (so the ids do not depend on the
  // thread count), then concatenate in input order; eos closes every document so the model sees
  // where one ends.
  t = Clock::now();
  const int32_t eos = tokenizer.eos_id();
  std::vector<std::vector<int32_t>> encoded(docs.size());
  std::atomic<size_t> done{0};
  std::atomic<int64_t> last_report_ms{0};
  parallel_for(threads, docs.size(), [&](size_t i) {
    encoded[i] = tokenizer.encode(docs[i].text);
    const size_t n = done.fetch_add(1) + 1;
    const auto ms = static_cast<int64_t>(common::seconds_since(t) * 1000);
    int64_t last = last_report_ms.load();
    if (ms - last > 2000 && last_report_ms.compare_exchange_strong(last, ms)) {
      say("encoded " + std::to_string(n) + "/" + std::to_string(docs.size()) + " documents");
    }
  });
  std::vector<int32_t> tokens[2];
  std::vector<uint64_t> offsets[2] = {{0}, {0}};
  for (size_t i = 0; i < docs.size(); ++i) {
    const Doc& d = docs[i];
    const int side = d.val ? 1 : 0;
    Domain& domain = domains[sources[d.source].domain];
    if (d.val && domain.val_docs == 0 && domain.val_tokens == 0) {
      domain.val_doc_begin = offsets[1].size() - 1;
      domain.val_token_begin = tokens[1].size();
    }
    std::vector<int32_t>& ids = encoded[i];
    tokens[side].insert(tokens[side].end(), ids.begin(), ids.end());
    (d.val ? domain.val_tokens : domain.train_tokens) += ids.size();
    std::vector<int32_t>().swap(ids);
    // Consecutive chunks of one document on the same side are one shard document: the text
    // runs on there, so no eos between them (cuts are at whitespace, so their ids are those of
    // the joined text). eos marks only real ends, and the gaps validation chunks leave.
    const bool runs_on = i + 1 < docs.size() && docs[i + 1].source == d.source &&
                         docs[i + 1].index == d.index && docs[i + 1].val == d.val;
    if (runs_on) continue;
    tokens[side].push_back(eos);
    offsets[side].push_back(tokens[side].size());
    (d.val ? domain.val_tokens : domain.train_tokens) += 1;
    (d.val ? domain.val_docs : domain.train_docs) += 1;
    (d.val ? sources[d.source].val_docs : sources[d.source].train_docs) += 1;
  }
  result.encode_seconds = common::seconds_since(t);
  result.train_docs = offsets[0].size() - 1;
  result.val_docs = offsets[1].size() - 1;
  result.train_tokens = tokens[0].size();
  result.val_tokens = tokens[1].size();
  say("encoded " + std::to_string(result.train_tokens) + " train + " +
      std::to_string(result.val_tokens) + " val tokens in " +
      json_double(std::round(result.encode_seconds * 100) / 100) + " s on " +
      std::to_string(threads) + " thread(s) (" +
      std::to_string(
          static_cast<uint64_t>(static_cast<double>(result.train_tokens + result.val_tokens) /
                                std::max(result.encode_seconds, 1e-9))) +
      " tokens/s)");
  if (domains.size() > 1) {
    for (const Domain& d : domains) {
      say("domain " + d.name + ": " + std::to_string(d.files) + " files, " + mb(d.bytes) + ", " +
          std::to_string(d.train_tokens) + " train / " + std::to_string(d.val_tokens) +
          " val tokens");
    }
  }

  // 5. Write. meta.json goes last: its presence means the directory is complete.
  std::error_code ec;
  fs::create_directories(options.out_dir, ec);
  if (ec) throw DataError(options.out_dir.string() + ": cannot create directory: " + ec.message());
  const fs::path model_path = options.out_dir / "tokenizer.model";
  const fs::path train_path = options.out_dir / "train.bin";
  const fs::path val_path = options.out_dir / "val.bin";
  tokenizer.save(model_path);
  write_token_shard(train_path, result.vocab_size, tokens[0], offsets[0]);
  write_token_shard(val_path, result.vocab_size, tokens[1], offsets[1]);
  // Reopening validates what landed on disk and yields the checksums for meta.json.
  const uint64_t train_sum = TokenShard::open(train_path).checksum();
  const uint64_t val_sum = TokenShard::open(val_path).checksum();
  const std::string& model = tokenizer.serialized_model();

  std::ostringstream j;
  j << "{\n"
    << "  \"format\": \"loopmoe-dataset\",\n"
    << "  \"version\": 1,\n"
    << "  \"vocab_size\": " << result.vocab_size << ",\n"
    << "  \"tokenizer\": {\n"
    << "    \"file\": \"tokenizer.model\",\n"
    << "    \"source\": "
    << (options.tokenizer_model.empty() ? std::string("\"trained\"")
                                        : json_string(options.tokenizer_model.string()))
    << ",\n"
    << "    \"xxh64\": \"" << hex64(XXH64(model.data(), model.size(), 0)) << "\",\n"
    << "    \"eos_id\": " << eos << ",\n"
    << "    \"document_terminator\": \"eos\"\n"
    << "  },\n"
    << "  \"split\": {\n"
    << "    \"rule\": \"val iff xxh64(basename + '#' + doc_index, seed) / 2^64 < val_fraction\",\n"
    << "    \"seed\": " << options.seed << ",\n"
    << "    \"val_fraction\": " << json_double(options.val_fraction) << ",\n"
    << "    \"docs_per_line\": " << (options.docs_per_line ? "true" : "false") << ",\n"
    << "    \"stratified_by\": \"domain (the input file's directory)\"";
  if (result.chunked_docs > 0) {  // absent otherwise, so unchunked datasets stay as they were
    j << ",\n"
      << "    \"chunking\": {\"rule\": \"documents over chunk_bytes cut at paragraph/line "
         "boundaries; chunk c of doc i: key basename + '#' + i + '.' + c\", \"chunk_bytes\": "
      << kChunkBytes << ", \"docs_cut\": " << result.chunked_docs
      << ", \"chunks\": " << result.chunks << ", \"val_chunks\": " << result.val_chunks << "}";
  }
  j << "\n"
    << "  },\n"
    << "  \"train\": {\"file\": \"train.bin\", \"docs\": " << result.train_docs
    << ", \"tokens\": " << result.train_tokens << ", \"xxh64\": \"" << hex64(train_sum) << "\"},\n"
    << "  \"val\": {\"file\": \"val.bin\", \"docs\": " << result.val_docs
    << ", \"tokens\": " << result.val_tokens << ", \"xxh64\": \"" << hex64(val_sum) << "\"},\n"
    << "  \"input_bytes\": " << result.input_bytes << ",\n"
    << "  \"sources\": [\n";
  for (size_t i = 0; i < sources.size(); ++i) {
    const Source& s = sources[i];
    j << "    {\"path\": " << json_string(s.path.string()) << ", \"bytes\": " << s.text.size()
      << ", \"train_docs\": " << s.train_docs << ", \"val_docs\": " << s.val_docs << "}"
      << (i + 1 < sources.size() ? ",\n" : "\n");
  }
  // Domains in shard order; a domain's validation documents are val.bin's documents
  // [val_doc_begin, val_doc_end) and its tokens [val_token_begin, val_token_end).
  j << "  ],\n"
    << "  \"domains\": [\n";
  for (size_t i = 0; i < domains.size(); ++i) {
    const Domain& d = domains[i];
    j << "    {\"name\": " << json_string(d.name) << ", \"files\": " << d.files
      << ", \"bytes\": " << d.bytes << ", \"train_docs\": " << d.train_docs
      << ", \"train_tokens\": " << d.train_tokens << ", \"val_docs\": " << d.val_docs
      << ", \"val_tokens\": " << d.val_tokens << ", \"val_doc_begin\": " << d.val_doc_begin
      << ", \"val_doc_end\": " << d.val_doc_begin + d.val_docs
      << ", \"val_token_begin\": " << d.val_token_begin
      << ", \"val_token_end\": " << d.val_token_begin + d.val_tokens << "}"
      << (i + 1 < domains.size() ? ",\n" : "\n");
  }
  j << "  ]\n}\n";
  common::write_file_atomically(options.out_dir / "meta.json", j.str(), throw_data_error);

  result.total_seconds = common::seconds_since(start);
  say("wrote " + options.out_dir.string() + "/{tokenizer.model,train.bin,val.bin,meta.json} in " +
      json_double(std::round(result.total_seconds * 100) / 100) + " s total");
  return result;
}

Dataset open_dataset(const fs::path& dir) {
  return Dataset{TokenShard::open(dir / "train.bin"), TokenShard::open(dir / "val.bin")};
}

}  // namespace loopmoe::dataloader
