// `data prepare` (prepare.h): read the inputs, split them (split.cc), train or load the tokenizer,
// encode, and write the shards and meta.json.
#include "dataloader/prepare.h"

#include <xxhash.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ostream>
#include <sstream>
#include <string_view>
#include <system_error>
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
using split_internal::Doc;
using split_internal::Source;
using split_internal::split_units;
using split_internal::top_up_validation;
using split_internal::val_bytes;

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

}  // namespace

PrepareResult prepare_dataset(const PrepareOptions& options) {
  const Clock::time_point start = Clock::now();
  std::ostream* log = options.log;
  auto say = [&](const std::string& line) {
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

  // 1. Read every input; documents are views into the file contents kept in `sources`.
  const std::vector<fs::path> files = expand_inputs(options.inputs);
  std::vector<Source> sources;
  sources.reserve(files.size());
  for (const fs::path& f : files) {
    Source s;
    s.path = f;
    s.name = f.filename().string();
    s.text = common::read_text_as<DataError>(f);
    check_utf8(f, s.text);
    if (blank(s.text)) throw DataError(f.string() + ": empty file (no text)");
    result.input_bytes += s.text.size();
    sources.push_back(std::move(s));
  }
  result.num_files = sources.size();

  std::vector<Doc> docs;
  for (size_t si = 0; si < sources.size(); ++si) {
    std::string_view text = sources[si].text;
    if (!options.docs_per_line) {
      docs.push_back({si, 0, -1, text, 0.0, false});
      continue;
    }
    uint64_t index = 0;
    while (!text.empty()) {
      const size_t nl = text.find('\n');
      const std::string_view line = text.substr(0, nl);
      text = nl == std::string_view::npos ? std::string_view() : text.substr(nl + 1);
      if (!blank(line)) docs.push_back({si, index++, -1, line, 0.0, false});
    }
  }
  say("read " + std::to_string(sources.size()) + " files (" + mb(result.input_bytes) + "), " +
      std::to_string(docs.size()) + " documents");

  // 2. Split by document. The fallbacks give both sides a document whenever there are two. When
  // the documents are too few for the fraction, or validation would get too little text, long
  // documents are cut into chunks and the split is redone over the pieces (docs/DATA.md), so one
  // big file still yields a validation split. Documents that are not cut keep their key.
  size_t num_val = split_units(docs, sources, options.seed, options.val_fraction);
  const std::string fraction = json_double(options.val_fraction);
  const uint64_t doc_val_bytes = val_bytes(docs);
  const bool too_few = static_cast<double>(docs.size()) * options.val_fraction < 1.0;
  if (too_few || doc_val_bytes < kMinValBytes) {
    std::vector<Doc> units;
    for (const Doc& d : docs) {
      if (d.text.size() <= kChunkBytes) {
        units.push_back(d);
        continue;
      }
      const std::vector<std::string_view> pieces = cut_document(d.text);
      ++result.chunked_docs;
      for (size_t c = 0; c < pieces.size(); ++c) {
        if (blank(pieces[c])) continue;  // whitespace only: nothing to learn from
        units.push_back({d.source, d.index, static_cast<int64_t>(c), pieces[c], 0.0, false});
        ++result.chunks;
      }
    }
    if (result.chunked_docs > 0) {
      docs = std::move(units);
      num_val = split_units(docs, sources, options.seed, options.val_fraction);
      num_val += top_up_validation(docs);
      for (const Doc& d : docs) result.val_chunks += d.val && d.chunk >= 0;
      say(std::string(too_few ? "documents too few for val fraction " + fraction
                              : "validation would hold only " + std::to_string(doc_val_bytes) +
                                    " bytes") +
          ": cut " + std::to_string(result.chunked_docs) + " document(s) longer than " +
          std::to_string(kChunkBytes) + " bytes into " + std::to_string(result.chunks) +
          " chunks at paragraph/line boundaries; " + std::to_string(result.val_chunks) +
          " chunks go to validation");
    }
  }
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

  // 4. Encode in input order; eos closes every document so the model sees where one ends.
  t = Clock::now();
  const int32_t eos = tokenizer.eos_id();
  std::vector<int32_t> tokens[2];
  std::vector<uint64_t> offsets[2] = {{0}, {0}};
  Clock::time_point last_report = t;
  for (size_t i = 0; i < docs.size(); ++i) {
    const Doc& d = docs[i];
    const int side = d.val ? 1 : 0;
    const std::vector<int32_t> ids = tokenizer.encode(d.text);
    tokens[side].insert(tokens[side].end(), ids.begin(), ids.end());
    // Consecutive chunks of one document on the same side are one shard document: the text
    // runs on there, so no eos between them (cuts are at whitespace, so their ids are those of
    // the joined text). eos marks only real ends, and the gaps validation chunks leave.
    const bool runs_on = i + 1 < docs.size() && docs[i + 1].source == d.source &&
                         docs[i + 1].index == d.index && docs[i + 1].val == d.val;
    if (runs_on) continue;
    tokens[side].push_back(eos);
    offsets[side].push_back(tokens[side].size());
    (d.val ? sources[d.source].val_docs : sources[d.source].train_docs) += 1;
    if (common::seconds_since(last_report) > 2.0) {
      last_report = Clock::now();
      say("encoded " + std::to_string(i + 1) + "/" + std::to_string(docs.size()) + " documents");
    }
  }
  result.encode_seconds = common::seconds_since(t);
  result.train_docs = offsets[0].size() - 1;
  result.val_docs = offsets[1].size() - 1;
  result.train_tokens = tokens[0].size();
  result.val_tokens = tokens[1].size();
  say("encoded " + std::to_string(result.train_tokens) + " train + " +
      std::to_string(result.val_tokens) + " val tokens in " +
      json_double(std::round(result.encode_seconds * 100) / 100) + " s");

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
    << "    \"docs_per_line\": " << (options.docs_per_line ? "true" : "false");
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
