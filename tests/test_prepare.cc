// Tests for `data prepare` (dataloader/prepare): a loadable, reproducible dataset from text
// files, the tokenizer it trains, and the document-level train/validation split.
#include <gtest/gtest.h>
#include <sentencepiece_processor.h>

#include <filesystem>
#include <set>
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
using test_util::kTinyVocab;
using test_util::make_text;
using test_util::normalize_ws;
using test_util::slurp;
using test_util::spit;
using test_util::TempDir;
using test_util::tiny_options;
using test_util::write_corpus;

TEST(PrepareTest, ProducesLoadableDataset) {
  TempDir dir;
  const std::vector<fs::path> files = write_corpus(dir / "corpus", 10);
  std::ostringstream log;
  PrepareOptions o = tiny_options(dir / "corpus", dir / "out");
  o.log = &log;
  const PrepareResult r = prepare_dataset(o);

  EXPECT_EQ(r.vocab_size, static_cast<uint32_t>(kTinyVocab));
  EXPECT_EQ(r.num_files, 10u);
  EXPECT_EQ(r.train_docs + r.val_docs, 10u);
  EXPECT_GE(r.train_docs, 1u);
  EXPECT_GE(r.val_docs, 1u);
  EXPECT_NE(log.str().find("training BPE tokenizer"), std::string::npos) << log.str();
  EXPECT_NE(log.str().find("encoded"), std::string::npos) << log.str();
  for (const char* f : {"tokenizer.model", "train.bin", "val.bin", "meta.json"}) {
    EXPECT_TRUE(fs::exists(dir / "out" / f)) << f;
    EXPECT_FALSE(fs::exists(dir / "out" / (std::string(f) + ".tmp"))) << f;
  }
  const std::string meta = slurp(dir / "out" / "meta.json");
  EXPECT_NE(meta.find("\"vocab_size\": " + std::to_string(kTinyVocab)), std::string::npos) << meta;
  EXPECT_NE(meta.find("\"docs_per_line\": false"), std::string::npos) << meta;

  const Dataset ds = open_dataset(dir / "out");
  EXPECT_EQ(ds.train.vocab_size(), static_cast<uint32_t>(kTinyVocab));
  EXPECT_EQ(ds.train.num_docs(), r.train_docs);
  EXPECT_EQ(ds.val.num_docs(), r.val_docs);
  EXPECT_EQ(ds.train.num_tokens(), r.train_tokens);
  EXPECT_EQ(ds.val.num_tokens(), r.val_tokens);

  // Every document decodes back to one of the inputs (modulo whitespace, which the sentencepiece
  // normalizer folds) and ends in exactly one eos.
  const Tokenizer tok = Tokenizer::load(dir / "out" / "tokenizer.model");
  EXPECT_EQ(tok.vocab_size(), kTinyVocab);
  EXPECT_EQ(tok.eos_id(), kEosId);
  std::set<std::string> inputs;
  for (const fs::path& f : files) inputs.insert(normalize_ws(slurp(f)));
  std::set<std::string> decoded;
  for (const TokenShard* shard : {&ds.train, &ds.val}) {
    for (uint64_t i = 0; i < shard->num_docs(); ++i) {
      const DocRange range = shard->doc_range(i);
      std::vector<int32_t> ids(range.end - range.begin);
      shard->read(range.begin, ids.size(), ids.data());
      ASSERT_FALSE(ids.empty());
      EXPECT_EQ(ids.back(), kEosId);
      ids.pop_back();
      EXPECT_EQ(std::count(ids.begin(), ids.end(), kEosId), 0);
      decoded.insert(tok.decode(ids));
    }
  }
  EXPECT_EQ(decoded, inputs);
}

TEST(TokenizerTest, ChunkedEncodingEqualsWholeTextEncoding) {
  // Tokenizer::encode cuts long lines at whitespace for speed; that must not change the ids.
  TempDir dir;
  write_corpus(dir / "corpus", 4);
  prepare_dataset(tiny_options(dir / "corpus", dir / "out"));
  const Tokenizer tok = Tokenizer::load(dir / "out" / "tokenizer.model");
  sentencepiece::SentencePieceProcessor sp;
  ASSERT_TRUE(sp.LoadFromSerializedProto(tok.serialized_model()).ok());

  std::string text = make_text(5, 4000);  // ~30 KB, cut into lines below
  std::string one_line = text;
  std::replace(one_line.begin(), one_line.end(), '\n', ' ');
  for (const std::string& t : {text, one_line, std::string(9000, 'x') + " tail"}) {
    std::vector<int> whole;
    ASSERT_TRUE(sp.Encode(t, &whole).ok());
    const std::vector<int32_t> chunked = tok.encode(t);
    EXPECT_EQ(std::vector<int32_t>(whole.begin(), whole.end()), chunked) << t.substr(0, 40);
  }
  EXPECT_TRUE(tok.encode(" \n\t ").empty());
  expect_error([&] { Tokenizer::load(dir / "out" / "meta.json"); }, dir / "out" / "meta.json",
               "not a sentencepiece model");
}

TEST(PrepareTest, ByteIdenticalAcrossRunsAndInputOrder) {
  TempDir dir;
  std::vector<fs::path> files = write_corpus(dir / "corpus", 6);
  prepare_dataset(tiny_options(dir / "corpus", dir / "a"));
  PrepareOptions o = tiny_options(dir / "corpus", dir / "b");
  prepare_dataset(o);
  // Listing the files by hand, in another order, must not change the result either... except for
  // the source paths recorded in meta.json, which are spelled as given.
  std::reverse(files.begin(), files.end());
  o.inputs = files;
  o.out_dir = dir / "c";
  prepare_dataset(o);
  for (const char* f : {"tokenizer.model", "train.bin", "val.bin", "meta.json"}) {
    EXPECT_EQ(slurp(dir / "a" / f), slurp(dir / "b" / f)) << f;
  }
  for (const char* f : {"tokenizer.model", "train.bin", "val.bin"}) {
    EXPECT_EQ(slurp(dir / "a" / f), slurp(dir / "c" / f)) << f;
  }
}

TEST(PrepareTest, GivenTokenizerReproducesShards) {
  TempDir dir;
  write_corpus(dir / "corpus", 5);
  prepare_dataset(tiny_options(dir / "corpus", dir / "a"));
  PrepareOptions o = tiny_options(dir / "corpus", dir / "b");
  o.vocab_size = 0;
  o.tokenizer_model = dir / "a" / "tokenizer.model";
  const PrepareResult r = prepare_dataset(o);
  EXPECT_EQ(r.vocab_size, static_cast<uint32_t>(kTinyVocab));
  for (const char* f : {"tokenizer.model", "train.bin", "val.bin"}) {
    EXPECT_EQ(slurp(dir / "a" / f), slurp(dir / "b" / f)) << f;
  }
  o.vocab_size = 512;
  expect_error([&] { prepare_dataset(o); }, o.tokenizer_model, "--vocab 512");
}

TEST(PrepareTest, DocsPerLine) {
  TempDir dir;
  fs::create_directories(dir / "corpus");
  std::string text;
  int lines = 0;
  for (int i = 0; i < 40; ++i) {
    std::string line = make_text(i, 20);
    std::replace(line.begin(), line.end(), '\n', ' ');
    text += line + "\n";
    ++lines;
    if (i % 9 == 0) text += "\n   \n";  // blank lines are not documents
  }
  spit(dir / "corpus" / "lines.txt", text);
  PrepareOptions o = tiny_options(dir / "corpus" / "lines.txt", dir / "out");
  o.docs_per_line = true;
  const PrepareResult r = prepare_dataset(o);
  EXPECT_EQ(r.train_docs + r.val_docs, static_cast<uint64_t>(lines));
  EXPECT_GE(r.val_docs, 1u);
  EXPECT_NE(slurp(dir / "out" / "meta.json").find("\"docs_per_line\": true"), std::string::npos);
}

TEST(PrepareTest, AddingAFileMovesNoOtherDocument) {
  TempDir dir;
  write_corpus(dir / "corpus", 12);
  prepare_dataset(tiny_options(dir / "corpus", dir / "a"));
  spit(dir / "corpus" / "extra.txt", make_text(99, 300));
  prepare_dataset(tiny_options(dir / "corpus", dir / "b"));
  // meta.json has one line per source with its train/val counts; every old line must survive.
  std::istringstream a(slurp(dir / "a" / "meta.json"));
  const std::string b = slurp(dir / "b" / "meta.json");
  int sources = 0;
  for (std::string line; std::getline(a, line);) {
    if (line.find("\"path\"") == std::string::npos) continue;
    ++sources;
    if (!line.empty() && line.back() == ',') line.pop_back();
    EXPECT_NE(b.find(line), std::string::npos) << line;
  }
  EXPECT_EQ(sources, 12);
}

TEST(PrepareTest, SplitRuleIsStableAndNearTheFraction) {
  int val = 0;
  for (int i = 0; i < 20000; ++i) {
    const bool v = is_validation_doc("f.txt", i, 1234, 0.05);
    EXPECT_EQ(v, is_validation_doc("f.txt", i, 1234, 0.05));
    val += v;
  }
  EXPECT_GT(val, 800);
  EXPECT_LT(val, 1200);
  // Chunk keys ("f.txt#0.<c>") too, and a chunk is not its document.
  int val_chunks = 0, same_as_doc = 0;
  for (int c = 0; c < 20000; ++c) {
    val_chunks += is_validation_chunk("f.txt", 0, c, 1234, 0.05);
    same_as_doc +=
        is_validation_chunk("f.txt", 0, c, 1234, 0.5) == is_validation_doc("f.txt", c, 1234, 0.5);
  }
  EXPECT_GT(val_chunks, 800);
  EXPECT_LT(val_chunks, 1200);
  EXPECT_LT(same_as_doc, 12000);
  // A different seed gives a different split.
  int same = 0;
  for (int i = 0; i < 2000; ++i) {
    same += is_validation_doc("f.txt", i, 1, 0.5) == is_validation_doc("f.txt", i, 2, 0.5);
  }
  EXPECT_LT(same, 1200);
}

TEST(PrepareTest, TwoDocumentsGiveOneEachSide) {
  TempDir dir;
  write_corpus(dir / "corpus", 2);
  for (double frac : {0.001, 0.999}) {
    PrepareOptions o = tiny_options(dir / "corpus", dir / "out");
    o.val_fraction = frac;
    const PrepareResult r = prepare_dataset(o);
    EXPECT_EQ(r.train_docs, 1u) << frac;
    EXPECT_EQ(r.val_docs, 1u) << frac;
  }
}

}  // namespace
}  // namespace loopmoe::dataloader
