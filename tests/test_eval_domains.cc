// Per-domain held-out perplexity of `loopmoe eval` (eval/domain_loss.h, docs/EVAL.md): a dataset
// prepared from three directories (one too short for a window) → train a few steps → eval.json's
// "domains" agree with a direct computation, are deterministic, are absent without meta.json's
// "domains", and a malformed meta.json is one clear error.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dataloader/data_error.h"
#include "dataloader/prepare.h"
#include "dataloader/sampler.h"
#include "dataloader/token_shard.h"
#include "eval/domain_loss.h"
#include "eval/evaluator.h"
#include "model/model.h"
#include "tests/dataloader_test_util.h"
#include "tests/tiny_run.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace loopmoe {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using nlohmann::ordered_json;

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
void write_all(const fs::path& p, const std::string& text) {
  std::ofstream(p, std::ios::binary) << text;
}
std::string numbered(const char* prefix, int i) {
  std::string name = prefix;
  name += std::to_string(i);
  name += ".txt";
  return name;
}

class EvalDomainsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = new fs::path(testing::fresh_test_dir("loopmoe_eval_domains", "suite"));
    const fs::path corpus = *root_ / "corpus";
    // Two domains with plenty of text, one whose validation half holds one window (fewer than a
    // batch) and one whose validation half is shorter than a window, so it is listed with no loss.
    for (const char* d : {"speeches", "letters", "notes", "memos"}) {
      fs::create_directories(corpus / d);
    }
    for (int i = 0; i < 12; ++i) {
      write_all(corpus / "speeches" / numbered("s", i), dataloader::test_util::make_text(i, 300));
      write_all(corpus / "letters" / numbered("l", i),
                dataloader::test_util::make_text(500 + i, 250));
    }
    write_all(corpus / "notes" / "a.txt", dataloader::test_util::make_text(900, 5));
    write_all(corpus / "notes" / "b.txt", dataloader::test_util::make_text(901, 5));
    write_all(corpus / "memos" / "a.txt", dataloader::test_util::make_text(902, 2));
    write_all(corpus / "memos" / "b.txt", dataloader::test_util::make_text(903, 2));
    dataloader::PrepareOptions p;
    p.inputs = {corpus / "speeches", corpus / "letters", corpus / "notes", corpus / "memos"};
    p.out_dir = *root_ / "data";
    p.vocab_size = dataloader::test_util::kTinyVocab;
    p.val_fraction = 0.25;
    p.seed = 7;
    dataloader::prepare_dataset(p);

    config_ = new model::Config(testing::tiny_loopmoe_config(*root_ / "data"));
    model::Config& c = *config_;
    c.model.vocab_size = dataloader::test_util::kTinyVocab;
    c.model.seq_len = 32;
    c.train.steps = 6;
    c.train.lr = 1e-2;
    c.train.eval_interval = 0;
    c.train.checkpoint_interval = 0;
    c.train.log_interval = 10;
    train::TrainOptions o;
    o.out_dir = (*root_ / "run").string();
    o.progress = false;
    train::run_training(c, o);
  }
  static void TearDownTestSuite() {
    fs::remove_all(*root_);
    delete root_;
    delete config_;
  }

  static eval::EvalOptions options() {
    eval::EvalOptions o;
    o.batches = 3;
    o.max_items = 4;
    o.loops = {1};
    o.halt_thresholds = {0.1};
    return o;
  }
  // A copy of the dataset whose meta.json `edit` rewrites (text → text).
  static fs::path edited_dataset(const std::string& name,
                                 const std::function<std::string(const std::string&)>& edit) {
    const fs::path dir = *root_ / name;
    fs::remove_all(dir);
    fs::copy(*root_ / "data", dir, fs::copy_options::recursive);
    write_all(dir / "meta.json", edit(read_all(dir / "meta.json")));
    return dir;
  }
  static json meta() { return json::parse(read_all(*root_ / "data" / "meta.json")); }

  static fs::path* root_;
  static model::Config* config_;
};
fs::path* EvalDomainsTest::root_ = nullptr;
model::Config* EvalDomainsTest::config_ = nullptr;

// Windows of seq_len + 1 tokens a domain's validation text holds.
uint64_t windows_of(const json& meta_domain, int seq_len) {
  const uint64_t n = meta_domain["val_tokens"];
  return n > static_cast<uint64_t>(seq_len) ? (n - 1) / seq_len : 0;
}

TEST_F(EvalDomainsTest, EvalJsonListsEachDomainDeterministically) {
  const std::string a = eval::run_eval((*root_ / "run").string(), options());
  const std::string b = eval::run_eval((*root_ / "run").string(), options());
  EXPECT_EQ(a, b);
  EXPECT_EQ(read_all(*root_ / "run" / "eval.json"), a);
  const json j = json::parse(a);
  const json m = meta()["domains"];
  ASSERT_TRUE(j.contains("domains")) << a;
  ASSERT_EQ(m.size(), 4u);
  ASSERT_EQ(j["domains"].size(), 4u);
  const int B = config_->train.batch_size, T = config_->model.seq_len;
  std::map<std::string, uint64_t> windows;
  for (size_t i = 0; i < m.size(); ++i) {
    const json& d = j["domains"][i];
    SCOPED_TRACE(d.dump());
    EXPECT_EQ(d["name"], m[i]["name"]);
    EXPECT_EQ(d["val_tokens"], m[i]["val_tokens"]);
    const uint64_t w = windows[d["name"]] = windows_of(m[i], T);
    // ceil(3 batches / 4 domains) = one forward each: a whole batch, or every window of a
    // domain that holds fewer.
    EXPECT_EQ(d["windows"], std::min<uint64_t>(w, B));
    EXPECT_EQ(d["tokens"], d["windows"].get<int64_t>() * T);
    if (w == 0) {
      EXPECT_TRUE(d["val_loss"].is_null());
      EXPECT_TRUE(d["perplexity"].is_null());
      continue;
    }
    const double loss = d["val_loss"];
    EXPECT_TRUE(std::isfinite(loss));
    EXPECT_GT(loss, 0);
    EXPECT_DOUBLE_EQ(d["perplexity"].get<double>(), std::exp(loss));
  }
  // The fixture covers each case: whole batches, one short forward, no window.
  EXPECT_GE(windows["speeches"], static_cast<uint64_t>(B));
  EXPECT_GE(windows["letters"], static_cast<uint64_t>(B));
  EXPECT_GE(windows["notes"], 1u);
  EXPECT_LT(windows["notes"], static_cast<uint64_t>(B));
  EXPECT_EQ(windows["memos"], 0u);
}

TEST_F(EvalDomainsTest, DomainLossEqualsADirectComputation) {
  eval::EvalOptions o = options();
  o.batches = 8;  // ceil(8 / 4) = 2 batches per domain, fewer where a domain holds fewer
  const json j = json::parse(eval::run_eval((*root_ / "run").string(), o));
  model::Config c;
  const std::unique_ptr<model::Model> model =
      train::load_model((*root_ / "run" / "checkpoint.bin").string(), &c);
  const dataloader::TokenShard val = dataloader::TokenShard::open(*root_ / "data" / "val.bin");
  const int B = c.train.batch_size, T = c.model.seq_len;
  const json m = meta()["domains"];
  int checked = 0;
  for (size_t i = 0; i < m.size(); ++i) {
    const json& d = j["domains"][i];
    SCOPED_TRACE(d.dump());
    const uint64_t w = windows_of(m[i], T);
    if (w == 0) continue;
    // A domain with fewer windows than a batch: one forward of all of them.
    const int rows = static_cast<int>(std::min<uint64_t>(w, B));
    const int forwards = w < static_cast<uint64_t>(B) ? 1 : std::min<int>(2, w / B);
    EXPECT_EQ(d["windows"], forwards * rows);
    dataloader::BatchSampler sampler(val, rows, T, 0, dataloader::WindowOrder::kSpread,
                                     m[i]["val_token_begin"], m[i]["val_token_end"]);
    std::vector<int32_t> in(static_cast<size_t>(rows) * T), tg(in.size());
    double total = 0;
    for (int k = 0; k < forwards; ++k) {
      sampler.next(in.data(), tg.data());
      total += model->forward(in.data(), tg.data(), rows, T).ce;
    }
    EXPECT_EQ(d["val_loss"].get<double>(), total / forwards);
    ++checked;
  }
  EXPECT_EQ(checked, 3);
}

TEST_F(EvalDomainsTest, WithoutDomainsInMetaThereIsNoFieldAndNothingElseChanges) {
  eval::EvalOptions o = options();
  o.data_dir = (*root_ / "data").string();
  ordered_json with = ordered_json::parse(eval::run_eval((*root_ / "run").string(), o));
  ASSERT_TRUE(with.contains("domains"));
  with.erase("domains");
  // A dataset prepared before domains were recorded: meta.json without the key.
  o.data_dir = edited_dataset("old_meta", [](const std::string& text) {
                 json m = json::parse(text);
                 m.erase("domains");
                 return m.dump(2);
               }).string();
  const std::string without = eval::run_eval((*root_ / "run").string(), o);
  EXPECT_EQ(without, with.dump(2) + "\n");
  // No meta.json at all (hand-written shards).
  const fs::path bare = edited_dataset("no_meta", [](const std::string& t) { return t; });
  fs::remove(bare / "meta.json");
  o.data_dir = bare.string();
  EXPECT_EQ(eval::run_eval((*root_ / "run").string(), o), without);
  // One domain: nothing to compare it with, and the figure would be the overall one.
  o.data_dir = edited_dataset("one_domain", [](const std::string& text) {
                 json m = json::parse(text);
                 m["domains"] = json::array({m["domains"][0]});
                 return m.dump(2);
               }).string();
  EXPECT_EQ(eval::run_eval((*root_ / "run").string(), o), without);
}

TEST_F(EvalDomainsTest, MalformedMetaJsonIsOneClearError) {
  struct Case {
    const char* name;
    std::function<std::string(const std::string&)> edit;
    const char* message;
  };
  auto with = [](const std::function<void(json&)>& f) {
    return [f](const std::string& text) {
      json m = json::parse(text);
      f(m);
      return m.dump(2);
    };
  };
  const std::vector<Case> cases = {
      {"bad_json", [](const std::string& t) { return t.substr(0, t.size() / 2); },
       "not valid JSON"},
      {"not_array", with([](json& m) { m["domains"] = "all"; }), "\"domains\" is not an array"},
      {"name_type", with([](json& m) { m["domains"][1]["name"] = 5; }),
       "domains[1]: \"name\" is missing or not a string"},
      {"begin_type", with([](json& m) { m["domains"][0]["val_token_begin"] = "0"; }),
       "\"val_token_begin\" is missing or not a non-negative integer"},
      {"negative", with([](json& m) { m["domains"][0]["val_token_end"] = -1; }),
       "\"val_token_end\" is missing or not a non-negative integer"},
      {"outside", with([](json& m) { m["domains"][2]["val_token_end"] = 1u << 30; }),
       "are not inside val.bin's"},
      {"reversed", with([](json& m) { m["domains"][1]["val_token_begin"] = 1u << 29; }),
       "are not inside val.bin's"},
      {"count", with([](json& m) { m["domains"][0]["val_tokens"] = 1; }),
       "\"val_tokens\" 1 is not val_token_end - val_token_begin"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    eval::EvalOptions o = options();
    const fs::path dir = edited_dataset(std::string("bad_") + c.name, c.edit);
    o.data_dir = dir.string();
    dataloader::test_util::expect_error([&] { eval::run_eval((*root_ / "run").string(), o); },
                                        dir / "meta.json", c.message);
  }
}

TEST(EvalDomainsPlan, WholeBatchesCappedAtTheDomainsWindows) {
  // ceil(16 / 3) = 6 batches of 4 when the domain holds them.
  EXPECT_EQ(eval::plan_domain(100, 4, 16, 3).forwards, 6);
  EXPECT_EQ(eval::plan_domain(100, 4, 16, 3).rows, 4);
  // Capped at the whole batches the domain holds: 10 windows, 2 batches.
  EXPECT_EQ(eval::plan_domain(10, 4, 16, 3).forwards, 2);
  // Fewer windows than one batch: one forward of all of them.
  EXPECT_EQ(eval::plan_domain(3, 4, 16, 3).forwards, 1);
  EXPECT_EQ(eval::plan_domain(3, 4, 16, 3).rows, 3);
  EXPECT_EQ(eval::plan_domain(0, 4, 16, 3).forwards, 0);
  // More domains than batches: still one batch each.
  EXPECT_EQ(eval::plan_domain(100, 4, 2, 5).forwards, 1);
}

}  // namespace
}  // namespace loopmoe
