// Tests for `data prepare` over several domains (one per input directory): the split is
// stratified by domain, meta.json counts tokens per domain and names each domain's range of
// val.bin, and the encoding threads do not change a byte. Also the kSpread validation order and
// the token range of dataloader/sampler.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "dataloader/prepare.h"
#include "dataloader/sampler.h"
#include "dataloader/token_shard.h"
#include "tests/dataloader_test_util.h"

namespace loopmoe::dataloader {
namespace {

namespace fs = std::filesystem;
using test_util::expect_error;
using test_util::make_text;
using test_util::slurp;
using test_util::spit;
using test_util::TempDir;
using test_util::tiny_options;

// "<prefix><i>.txt" (built with += : GCC 12 warns falsely on a chain of operator+ here).
std::string numbered(const std::string& prefix, int i) {
  std::string name = prefix;
  name += std::to_string(i);
  name += ".txt";
  return name;
}

// Three domains of different shapes: many short documents ("speeches"), three long ones that
// are too few for the fraction on their own ("dictionary", cut into chunks within the domain) and
// two short ones ("notes", the domain's own fallback gives each side one).
void write_domains(const fs::path& root) {
  fs::create_directories(root / "speeches");
  fs::create_directories(root / "dictionary");
  fs::create_directories(root / "notes");
  for (int i = 0; i < 30; ++i) {
    spit(root / "speeches" / numbered("s", i), make_text(i, 200));
  }
  for (int i = 0; i < 3; ++i) {
    std::string book;
    for (int p = 0; p < 40; ++p) book += make_text(500 + 40 * i + p, 120) + "\n";
    spit(root / "dictionary" / numbered("d", i), book);
  }
  spit(root / "notes" / "a.txt", make_text(900, 80));
  spit(root / "notes" / "b.txt", make_text(901, 80));
}

PrepareOptions domain_options(const fs::path& root, const fs::path& out) {
  PrepareOptions o = tiny_options(root / "speeches", out);
  // Given out of order, interleaved with a file: the files are grouped by directory anyway.
  o.inputs = {root / "notes", root / "speeches", root / "dictionary" / "d1.txt",
              root / "dictionary"};
  o.val_fraction = 0.1;
  return o;
}

TEST(PrepareDomainsTest, SplitIsStratifiedAndMetaNamesEachDomainsRangeOfVal) {
  TempDir dir;
  write_domains(dir.path());
  std::ostringstream log;
  PrepareOptions o = domain_options(dir.path(), dir / "out");
  o.log = &log;
  const PrepareResult r = prepare_dataset(o);
  EXPECT_NE(log.str().find("in 3 domains"), std::string::npos) << log.str();
  EXPECT_NE(log.str().find("domain dictionary: documents too few for val fraction 0.1: cut 3"),
            std::string::npos)
      << log.str();

  const nlohmann::json meta = nlohmann::json::parse(slurp(dir / "out" / "meta.json"));
  const nlohmann::json& domains = meta.at("domains");
  ASSERT_EQ(domains.size(), 3u);
  // Shard order: domains in the order the sorted paths reach their directories.
  EXPECT_EQ(domains[0].at("name"), "dictionary");
  EXPECT_EQ(domains[1].at("name"), "notes");
  EXPECT_EQ(domains[2].at("name"), "speeches");
  EXPECT_EQ(domains[0].at("files"), 3);
  EXPECT_EQ(domains[1].at("files"), 2);
  EXPECT_EQ(domains[2].at("files"), 30);

  const TokenShard val = TokenShard::open(dir / "out" / "val.bin");
  const TokenShard train = TokenShard::open(dir / "out" / "train.bin");
  uint64_t train_tokens = 0, val_tokens = 0, train_docs = 0, val_docs = 0, next_doc = 0;
  for (const nlohmann::json& d : domains) {
    SCOPED_TRACE(d.dump());
    // Stratified: every domain has text on both sides.
    EXPECT_GT(d.at("train_tokens").get<uint64_t>(), 0u);
    EXPECT_GT(d.at("val_tokens").get<uint64_t>(), 0u);
    // The domains' validation ranges tile val.bin, documents and tokens alike.
    const uint64_t b = d.at("val_doc_begin"), e = d.at("val_doc_end");
    EXPECT_EQ(b, next_doc);
    EXPECT_EQ(e - b, d.at("val_docs").get<uint64_t>());
    EXPECT_EQ(val.doc_range(b).begin, d.at("val_token_begin").get<uint64_t>());
    EXPECT_EQ(val.doc_range(e - 1).end, d.at("val_token_end").get<uint64_t>());
    EXPECT_EQ(d.at("val_token_end").get<uint64_t>() - d.at("val_token_begin").get<uint64_t>(),
              d.at("val_tokens").get<uint64_t>());
    next_doc = e;
    train_tokens += d.at("train_tokens").get<uint64_t>();
    val_tokens += d.at("val_tokens").get<uint64_t>();
    train_docs += d.at("train_docs").get<uint64_t>();
    val_docs += d.at("val_docs").get<uint64_t>();
  }
  EXPECT_EQ(next_doc, val.num_docs());
  EXPECT_EQ(train_tokens, train.num_tokens());
  EXPECT_EQ(val_tokens, val.num_tokens());
  EXPECT_EQ(train_tokens, r.train_tokens);
  EXPECT_EQ(val_tokens, r.val_tokens);
  EXPECT_EQ(train_docs, r.train_docs);
  EXPECT_EQ(val_docs, r.val_docs);
  // The two notes: one each side, by the domain's own fallback.
  EXPECT_EQ(domains[1].at("train_docs"), 1);
  EXPECT_EQ(domains[1].at("val_docs"), 1);
  // The dictionary was cut into chunks; validation holds some of them.
  EXPECT_EQ(r.chunked_docs, 3u);
  EXPECT_GE(r.val_chunks, 1u);
  EXPECT_EQ(meta.at("split").at("chunking").at("docs_cut"), 3);
}

TEST(PrepareDomainsTest, OutputDoesNotDependOnTheThreadCount) {
  TempDir dir;
  write_domains(dir.path());
  std::vector<std::string> outputs;
  for (int threads : {1, 2, 3}) {
    PrepareOptions o = domain_options(dir.path(), dir / numbered("out", threads));
    o.threads = threads;
    prepare_dataset(o);
    std::string all;
    for (const char* f : {"tokenizer.model", "train.bin", "val.bin", "meta.json"}) {
      all += slurp(o.out_dir / f);
    }
    outputs.push_back(all);
  }
  EXPECT_EQ(outputs[0], outputs[1]);
  EXPECT_EQ(outputs[0], outputs[2]);

  PrepareOptions bad = domain_options(dir.path(), dir / "bad");
  bad.threads = -1;
  expect_error([&] { prepare_dataset(bad); }, "", "--threads must be 0 (all cores) or positive");
}

TEST(PrepareDomainsTest, DirectoriesSharingABaseNameAreNamedByPath) {
  TempDir dir;
  for (const char* parent : {"a", "b"}) {
    fs::create_directories(dir / parent / "docs");
    for (int i = 0; i < 12; ++i) {
      spit(dir / parent / "docs" / numbered(parent, i),
           make_text(i + (parent[0] == 'a' ? 0 : 100), 150));
    }
  }
  PrepareOptions o = tiny_options(dir / "a" / "docs", dir / "out");
  o.inputs = {dir / "a" / "docs", dir / "b" / "docs"};
  prepare_dataset(o);
  const nlohmann::json meta = nlohmann::json::parse(slurp(dir / "out" / "meta.json"));
  ASSERT_EQ(meta.at("domains").size(), 2u);
  EXPECT_EQ(meta["domains"][0]["name"],
            fs::absolute(dir / "a" / "docs").lexically_normal().string());
  EXPECT_EQ(meta["domains"][1]["name"],
            fs::absolute(dir / "b" / "docs").lexically_normal().string());
}

// ---------------------------------------------------------------------------------------------
// Validation order and token ranges of the sampler

TEST(SpreadOrderTest, IsAPermutationWhosePrefixesCoverTheRange) {
  EXPECT_EQ(spread_order(10), (std::vector<uint64_t>{0, 8, 4, 2, 6, 1, 9, 5, 3, 7}));
  EXPECT_EQ(spread_order(1), (std::vector<uint64_t>{0}));
  EXPECT_TRUE(spread_order(0).empty());
  for (uint64_t n : {2u, 7u, 64u, 1000u}) {
    const std::vector<uint64_t> order = spread_order(n);
    std::set<uint64_t> seen(order.begin(), order.end());
    ASSERT_EQ(seen.size(), n);
    ASSERT_EQ(*seen.rbegin(), n - 1);
    // Any prefix of length k >= 4 has a window in each quarter of [0, n).
    for (size_t k = 4; k <= n; k *= 2) {
      std::set<uint64_t> quarters;
      for (size_t i = 0; i < k; ++i) quarters.insert(order[i] * 4 / n);
      EXPECT_EQ(quarters.size(), 4u) << "n " << n << " prefix " << k;
    }
  }
}

TEST(SpreadOrderTest, SamplerReadsSpreadWindowsInsideItsRange) {
  TempDir dir;
  std::vector<int32_t> tokens(1000);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(i % 997);
  const std::vector<uint64_t> offsets = {0, 400, 1000};
  write_token_shard(dir / "s.bin", 1000, tokens, offsets);
  const TokenShard shard = TokenShard::open(dir / "s.bin");
  // Tokens [100, 341): (341 - 100 - 1) / 8 = 30 windows of 9 tokens.
  BatchSampler s(shard, 2, 8, 0, WindowOrder::kSpread, 100, 341);
  EXPECT_EQ(s.windows_per_epoch(), 30u);
  const std::vector<uint64_t> order = spread_order(30);
  std::vector<int32_t> in(16), tg(16);
  for (int batch = 0; batch < 20; ++batch) {  // 40 windows: over an epoch boundary
    s.next(in.data(), tg.data());
    for (int b = 0; b < 2; ++b) {
      const uint64_t w = order[(2 * batch + b) % 30];
      EXPECT_EQ(in[b * 8], static_cast<int32_t>(100 + 8 * w)) << batch << " " << b;
      EXPECT_EQ(tg[b * 8 + 7], static_cast<int32_t>(100 + 8 * w + 8)) << batch << " " << b;
    }
  }
  expect_error([&] { BatchSampler(shard, 1, 8, 0, WindowOrder::kSpread, 500, 400); }, dir / "s.bin",
               "is not inside the shard's 1000 tokens");
  expect_error([&] { BatchSampler(shard, 1, 8, 0, WindowOrder::kSpread, 0, 1001); }, dir / "s.bin",
               "is not inside");
  expect_error([&] { BatchSampler(shard, 1, 8, 0, WindowOrder::kSpread, 10, 18); }, dir / "s.bin",
               "range holds 8, one window needs 9");
}

}  // namespace
}  // namespace loopmoe::dataloader
