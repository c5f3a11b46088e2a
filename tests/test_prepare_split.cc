// Tests for `data prepare` cutting long documents into chunks so that one big file still gives a
// validation split (dataloader/split), and its errors.
#include <gtest/gtest.h>

#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "dataloader/prepare.h"
#include "dataloader/token_shard.h"
#include "dataloader/tokenizer.h"
#include "tests/dataloader_test_util.h"

namespace loopmoe::dataloader {
namespace {

namespace fs = std::filesystem;
using test_util::expect_error;
using test_util::make_text;
using test_util::normalize_ws;
using test_util::slurp;
using test_util::spit;
using test_util::TempDir;
using test_util::tiny_options;
using test_util::write_corpus;

// ---------------------------------------------------------------------------------------------
// Chunking: one big file still gives a validation split

// `paragraphs` paragraphs of make_text(…, words), each followed by a blank line (150 words: about
// 1.1 KB a paragraph).
std::string make_book(int paragraphs, int words = 150) {
  std::string s;
  for (int i = 0; i < paragraphs; ++i) s += make_text(1000 + i, words) + "\n";
  return s;
}

TEST(CutDocumentTest, PrefersParagraphsThenLinesThenSpacesAndCoversTheText) {
  // Paragraphs of ~400 bytes and cuts that may move a quarter of ~1.9 KB: one is always in reach.
  const std::string book = make_book(36, 50);
  const std::vector<std::string_view> pieces = cut_document(book, 2000);
  const size_t k = (book.size() + 1999) / 2000;
  ASSERT_EQ(pieces.size(), k);
  size_t offset = 0;
  for (size_t i = 0; i < pieces.size(); ++i) {
    EXPECT_EQ(pieces[i].data(), book.data() + offset) << i;  // consecutive views into the text
    const double share = static_cast<double>(pieces[i].size()) * k / book.size();
    EXPECT_GE(share, 0.5) << i;
    EXPECT_LE(share, 1.5) << i;
    if (i > 0) {
      EXPECT_EQ(book.substr(offset - 2, 2), "\n\n") << "cut " << i << " is not at a paragraph";
    }
    offset += pieces[i].size();
  }
  EXPECT_EQ(offset, book.size());

  // No blank lines: cuts fall on line starts. No newlines: after a space. Neither: on a UTF-8
  // character start, never inside "é".
  std::string lines;
  for (int i = 0; i < 200; ++i) lines += "line number " + std::to_string(i) + " of the file\n";
  ASSERT_GT(cut_document(lines, 1000).size(), 2u);
  for (std::string_view p : cut_document(lines, 1000)) EXPECT_EQ(p.back(), '\n');
  std::string one_line = lines;
  std::replace(one_line.begin(), one_line.end(), '\n', ' ');
  for (std::string_view p : cut_document(one_line, 1000)) EXPECT_EQ(p.back(), ' ');
  std::string accents;
  for (int i = 0; i < 3000; ++i) accents += "\xc3\xa9";  // é
  size_t total = 0;
  for (std::string_view p : cut_document(accents, 1000)) {
    EXPECT_EQ(p.size() % 2, 0u);
    EXPECT_EQ(p.substr(0, 2), "\xc3\xa9");
    total += p.size();
  }
  EXPECT_EQ(total, accents.size());

  // Documents up to the chunk size are not cut.
  EXPECT_EQ(cut_document("short text", 1000).size(), 1u);
  EXPECT_EQ(cut_document(std::string(kChunkBytes, 'a')).size(), 1u);
  EXPECT_EQ(cut_document(std::string(kChunkBytes + 1, 'a')).size(), 2u);
}

TEST(PrepareTest, OneFileIsChunkedIntoBothSplitsDeterministically) {
  TempDir dir;
  fs::create_directories(dir / "in");
  const std::string book = make_book(100);  // ~110 KB: 14 chunks
  spit(dir / "in" / "book.txt", book);
  PrepareOptions o = tiny_options(dir / "in" / "book.txt", dir / "a");
  std::ostringstream log;
  o.log = &log;
  const PrepareResult r = prepare_dataset(o);
  EXPECT_EQ(r.chunked_docs, 1u);
  EXPECT_EQ(r.chunks, (book.size() + kChunkBytes - 1) / kChunkBytes);
  EXPECT_GE(r.val_chunks, 1u);
  EXPECT_GE(r.train_docs, 1u);
  EXPECT_GE(r.val_docs, 1u);
  EXPECT_GT(r.val_tokens, 200u);
  EXPECT_GT(r.train_tokens, r.val_tokens);
  EXPECT_NE(log.str().find("documents too few for val fraction 0.2: cut 1 document(s)"),
            std::string::npos)
      << log.str();
  EXPECT_NE(slurp(dir / "a" / "meta.json").find("\"chunking\": {"), std::string::npos);

  // The split is the hash rule over "book.txt#0.<c>", and consecutive chunks on one side are one
  // shard document whose ids are those of the joined text.
  const std::vector<std::string_view> pieces = cut_document(book);
  std::vector<std::string> val_runs, train_runs;
  uint64_t val_chunks = 0, val_bytes = 0;
  for (size_t c = 0; c < pieces.size(); ++c) {
    const bool val = is_validation_chunk("book.txt", 0, c, o.seed, o.val_fraction);
    val_chunks += val;
    val_bytes += val ? pieces[c].size() : 0;
    std::vector<std::string>& runs = val ? val_runs : train_runs;
    const bool continues =
        c > 0 && is_validation_chunk("book.txt", 0, c - 1, o.seed, o.val_fraction) == val;
    if (continues) {
      runs.back() += pieces[c];
    } else {
      runs.emplace_back(pieces[c]);
    }
  }
  ASSERT_GE(val_bytes, kMinValBytes) << "pick another seed: this test assumes no fallback";
  EXPECT_EQ(r.val_chunks, val_chunks);
  const Dataset ds = open_dataset(dir / "a");
  const Tokenizer tok = Tokenizer::load(dir / "a" / "tokenizer.model");
  for (const auto& [shard, runs] :
       {std::pair{&ds.train, &train_runs}, std::pair{&ds.val, &val_runs}}) {
    ASSERT_EQ(shard->num_docs(), runs->size());
    for (uint64_t i = 0; i < shard->num_docs(); ++i) {
      const DocRange range = shard->doc_range(i);
      std::vector<int32_t> ids(range.end - range.begin);
      shard->read(range.begin, ids.size(), ids.data());
      EXPECT_EQ(ids.back(), kEosId);
      ids.pop_back();
      EXPECT_EQ(std::count(ids.begin(), ids.end(), kEosId), 0);
      EXPECT_EQ(ids, tok.encode((*runs)[i])) << i;
      EXPECT_EQ(tok.decode(ids), normalize_ws((*runs)[i])) << i;
    }
  }

  // Byte-identical again.
  o.out_dir = dir / "b";
  o.log = nullptr;
  prepare_dataset(o);
  for (const char* f : {"tokenizer.model", "train.bin", "val.bin", "meta.json"}) {
    EXPECT_EQ(slurp(dir / "a" / f), slurp(dir / "b" / f)) << f;
  }
}

TEST(PrepareTest, ManyDocumentsAreSplitByDocumentAsBefore) {
  // 30 documents of ~10 KB at 0.2: enough documents and validation text, so nothing is cut (even
  // though every document is longer than kChunkBytes) and each one is where is_validation_doc
  // puts it.
  TempDir dir;
  fs::create_directories(dir / "corpus");
  const auto doc_name = [](int i) {
    std::string name = "d";
    name += std::to_string(i);
    return name += ".txt";
  };
  for (int i = 0; i < 30; ++i) spit(dir / "corpus" / doc_name(i), make_text(i, 1500));
  const PrepareResult r = prepare_dataset(tiny_options(dir / "corpus", dir / "out"));
  EXPECT_EQ(r.chunked_docs, 0u);
  EXPECT_EQ(r.train_docs + r.val_docs, 30u);
  const std::string meta = slurp(dir / "out" / "meta.json");
  EXPECT_EQ(meta.find("chunking"), std::string::npos);
  uint64_t want_val = 0;
  for (int i = 0; i < 30; ++i) {
    const std::string name = doc_name(i);
    const bool val = is_validation_doc(name, 0, 7, 0.2);
    want_val += val;
    std::string line = name;
    line += "\", \"bytes\": ";
    line += std::to_string(make_text(i, 1500).size());
    line += val ? ", \"train_docs\": 0, \"val_docs\": 1" : ", \"train_docs\": 1, \"val_docs\": 0";
    EXPECT_NE(meta.find(line), std::string::npos) << line;
  }
  EXPECT_EQ(r.val_docs, want_val);
}

TEST(PrepareTest, BigFileBesideATinyOneIsChunked) {
  // Two documents cannot hold out 5%: the fallback alone could have made the 40-byte note the
  // whole validation split. The book is cut (the note keeps its key "note.txt#0"), and validation
  // is topped up to kMinValBytes with book chunks.
  TempDir dir;
  fs::create_directories(dir / "in");
  spit(dir / "in" / "book.txt", make_book(100));
  spit(dir / "in" / "note.txt", "A short note that says almost nothing.\n");
  PrepareOptions o = tiny_options(dir / "in", dir / "out");
  o.val_fraction = 0.05;
  const PrepareResult r = prepare_dataset(o);
  EXPECT_EQ(r.chunked_docs, 1u);
  EXPECT_GE(r.val_chunks, 1u);
  EXPECT_GT(r.val_tokens, 500u);
  EXPECT_GE(r.train_docs + r.val_docs, 3u);  // the note is a document of its own
}

TEST(PrepareTest, ChunkingLeavesShortDocumentsAlone) {
  // Few documents, none long: chunking has nothing to cut, and the split is the document split.
  TempDir dir;
  write_corpus(dir / "corpus", 3);
  PrepareOptions o = tiny_options(dir / "corpus", dir / "out");
  o.val_fraction = 0.05;
  const PrepareResult r = prepare_dataset(o);
  EXPECT_EQ(r.chunked_docs, 0u);
  EXPECT_EQ(r.train_docs + r.val_docs, 3u);
  EXPECT_EQ(r.val_docs, 1u);
}

TEST(PrepareTest, TooLittleTextForASplitIsAClearError) {
  TempDir dir;
  fs::create_directories(dir / "in");
  spit(dir / "in" / "small.txt", make_book(4));  // ~4.5 KB: one document, too short to cut
  PrepareOptions o = tiny_options(dir / "in" / "small.txt", dir / "out");
  expect_error([&] { prepare_dataset(o); }, dir / "in" / "small.txt",
               "too little text for a train/validation split: the corpus is one document of ");
  EXPECT_FALSE(fs::exists(dir / "out"));  // nothing written, not even the directory
  o.docs_per_line = true;
  spit(dir / "in" / "small.txt", "\n\n  one single line\n\n");
  expect_error([&] { prepare_dataset(o); }, dir / "in" / "small.txt", "one line of 17 bytes");
  EXPECT_FALSE(fs::exists(dir / "out"));
}

TEST(PrepareTest, Errors) {
  TempDir dir;
  write_corpus(dir / "corpus", 3);
  const fs::path out = dir / "out";

  PrepareOptions o = tiny_options(dir / "corpus", out);
  o.inputs.clear();
  expect_error([&] { prepare_dataset(o); }, "--input", "no input");

  o = tiny_options(dir / "missing", out);
  expect_error([&] { prepare_dataset(o); }, dir / "missing", "no such file");

  fs::create_directories(dir / "no_txt");
  spit(dir / "no_txt" / "a.md", "text");
  o = tiny_options(dir / "no_txt", out);
  expect_error([&] { prepare_dataset(o); }, dir / "no_txt", "no *.txt");

  spit(dir / "corpus" / "empty.txt", " \n\n");
  o = tiny_options(dir / "corpus", out);
  expect_error([&] { prepare_dataset(o); }, dir / "corpus" / "empty.txt", "empty file");
  fs::remove(dir / "corpus" / "empty.txt");

  spit(dir / "corpus" / "latin1.txt", "caf\xe9 au lait");
  expect_error([&] { prepare_dataset(o); }, dir / "corpus" / "latin1.txt", "not valid UTF-8");
  fs::remove(dir / "corpus" / "latin1.txt");

  o.vocab_size = 100;
  expect_error([&] { prepare_dataset(o); }, "--vocab 100", "too small");

  o.vocab_size = 5000;  // far more pieces than three short files can supply
  expect_error([&] { prepare_dataset(o); }, "tokenizer training", "5000");

  o = tiny_options(dir / "corpus", out);
  o.val_fraction = 1.0;
  expect_error([&] { prepare_dataset(o); }, "--val-fraction", "(0, 1)");
  EXPECT_FALSE(fs::exists(out / "meta.json"));
}

}  // namespace
}  // namespace loopmoe::dataloader
