// Evaluation end to end on a tiny real-text dataset (data prepare → train → eval): eval.json is
// reproducible and self-consistent, and the cloze / multiple-choice tasks are deterministic and
// well-formed.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "dataloader/data_error.h"
#include "dataloader/prepare.h"
#include "dataloader/sampler.h"
#include "dataloader/token_shard.h"
#include "dataloader/tokenizer.h"
#include "eval/eval_tasks.h"
#include "eval/evaluator.h"
#include "model/model.h"
#include "tests/tiny_run.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace loopmoe {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Plain English prose from a small grammar: real sentences (with an abbreviation and questions)
// that the sentence splitter, the cloze and the multiple-choice builders have to handle.
std::string make_document(int doc) {
  static const char* kSubjects[] = {"The old farmer",  "A young sailor", "My neighbor",
                                    "The tired baker", "Mr. Brown",      "The quiet teacher",
                                    "Her brother",     "The king"};
  static const char* kVerbs[] = {"sold", "painted", "found", "carried", "lost", "built", "mended"};
  static const char* kObjects[] = {"a red boat",   "the small house", "three apples",
                                   "an old map",   "the golden key",  "a wooden chair",
                                   "two blue cups"};
  static const char* kPlaces[] = {"near the river", "before the storm", "in the morning",
                                  "at the market",  "behind the barn",  "after dinner"};
  uint64_t state = 0x9E3779B97F4A7C15ull * (doc + 1);
  auto pick = [&](int n) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<int>((state >> 33) % n);
  };
  std::string text;
  for (int s = 0; s < 40; ++s) {
    const int kind = pick(5);
    if (kind == 0) {
      text += std::string("Why did ") + kSubjects[pick(8)] + " leave " + kObjects[pick(7)] + " " +
              kPlaces[pick(6)] + "? ";
    } else {
      text += std::string(kSubjects[pick(8)]) + " " + kVerbs[pick(7)] + " " + kObjects[pick(7)] +
              " " + kPlaces[pick(6)] + (kind == 1 ? ", and nobody knew why" : "") + ". ";
    }
    if (s % 9 == 8) text += "\n";
  }
  return text;
}

class EvalTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = new fs::path(fs::temp_directory_path() /
                         ("loopmoe_eval_test_" + std::to_string(::getpid())));
    fs::remove_all(*root_);
    fs::create_directories(*root_ / "corpus");
    for (int d = 0; d < 10; ++d) {
      std::ofstream(*root_ / "corpus" / ("doc" + std::to_string(d) + ".txt")) << make_document(d);
    }
    dataloader::PrepareOptions p;
    p.inputs = {*root_ / "corpus"};
    p.out_dir = *root_ / "eval_test_data";
    p.vocab_size = 400;
    p.val_fraction = 0.3;
    p.seed = 7;
    dataloader::prepare_dataset(p);

    config_ = new model::Config(testing::tiny_loopmoe_config(*root_ / "eval_test_data"));
    model::Config& c = *config_;
    c.model.vocab_size = 400;
    c.model.seq_len = 64;
    c.model.capacity_factor = 0;
    c.train.steps = 20;
    c.train.lr = 1e-2;
    c.train.eval_interval = 0;
    c.train.checkpoint_interval = 0;
    c.train.log_interval = 10;
    train::TrainOptions o;
    o.out_dir = (*root_ / "loop").string();
    o.progress = false;
    final_val_loss_ = train::run_training(c, o).final_val_loss;

    model::Config vanilla = c;
    vanilla.model.n_loops = 1;
    vanilla.model.iter_adaln = model::IterAdaLNMode::kOff;
    vanilla.train.steps = 5;
    o.out_dir = (*root_ / "vanilla").string();
    train::run_training(vanilla, o);
  }
  static void TearDownTestSuite() {
    fs::remove_all(*root_);
    delete root_;
    delete config_;
  }

  static eval::EvalOptions options() {
    eval::EvalOptions o;
    o.batches = 2;  // = train.eval_batches, so val_loss must equal the trainer's figure
    o.max_items = 12;
    return o;
  }
  static dataloader::Tokenizer tokenizer() {
    return dataloader::Tokenizer::load(*root_ / "eval_test_data" / "tokenizer.model");
  }
  static std::vector<std::string> docs() {
    const dataloader::TokenShard val =
        dataloader::TokenShard::open(*root_ / "eval_test_data" / "val.bin");
    return eval::held_out_texts(val, tokenizer());
  }
  static eval::TaskOptions task_options() {
    eval::TaskOptions t;
    t.seq_len = config_->model.seq_len;
    t.max_items = 12;
    return t;
  }

  static fs::path* root_;
  static model::Config* config_;
  static double final_val_loss_;
};
fs::path* EvalTest::root_ = nullptr;
model::Config* EvalTest::config_ = nullptr;
double EvalTest::final_val_loss_ = 0;

TEST_F(EvalTest, RunTwiceGivesIdenticalJson) {
  const std::string a = eval::run_eval((*root_ / "loop").string(), options());
  EXPECT_EQ(read_all(*root_ / "loop" / "eval.json"), a);
  const std::string b = eval::run_eval((*root_ / "loop").string(), options());
  EXPECT_EQ(a, b);
  EXPECT_FALSE(fs::exists(*root_ / "loop" / "eval.json.tmp"));

  const json j = json::parse(a);
  EXPECT_EQ(j["run"], "loop");
  EXPECT_EQ(j["val_tokens"], 2 * 4 * 64);
  EXPECT_DOUBLE_EQ(j["perplexity"].get<double>(), std::exp(j["val_loss"].get<double>()));
  EXPECT_EQ(j["cloze"]["items"], 12);
  EXPECT_EQ(j["multiple_choice"]["items"], 12);
  for (const char* key : {"accuracy", "target_loss"}) {
    EXPECT_TRUE(j["cloze"][key].is_number()) << key;
  }
  const double acc = j["multiple_choice"]["accuracy"],
               acc_norm = j["multiple_choice"]["accuracy_norm"];
  EXPECT_GE(acc, 0);
  EXPECT_LE(acc, 1);
  EXPECT_GE(acc_norm, 0);
  EXPECT_LE(acc_norm, 1);
  EXPECT_GT(j["cloze"]["target_loss"].get<double>(), 0);
  // Default sweep of a looped model: 1..2R; default thresholds.
  ASSERT_EQ(j["loop_sweep"].size(), 4u);
  for (int k = 0; k < 4; ++k) EXPECT_EQ(j["loop_sweep"][k]["loops"], k + 1);
  EXPECT_EQ(j["adaptive"].size(), 5u);
  ASSERT_EQ(j["logit_lens"].size(), 2u);
}

TEST_F(EvalTest, FiguresAgreeWithEachOther) {
  eval::EvalOptions o = options();
  o.loops = {1, 3};
  o.halt_thresholds = {1e9, 1e-30};
  const json j = json::parse(eval::run_eval((*root_ / "loop").string(), o));
  const double val = j["val_loss"];
  // The trainer computed its final validation loss over the same batches.
  EXPECT_DOUBLE_EQ(val, final_val_loss_);
  // Decoding after the last iteration is the model's own output.
  ASSERT_EQ(j["logit_lens"].size(), 2u);
  EXPECT_EQ(j["logit_lens"][1]["iteration"], 1);
  EXPECT_DOUBLE_EQ(j["logit_lens"][1]["loss"].get<double>(), val);
  // --loops adds to the trained R (sorted, once each); at R the sweep is the validation loss.
  ASSERT_EQ(j["loop_sweep"].size(), 3u);
  EXPECT_EQ(j["loop_sweep"][0]["loops"], 1);
  EXPECT_EQ(j["loop_sweep"][1]["loops"], 2);
  EXPECT_EQ(j["loop_sweep"][2]["loops"], 3);
  EXPECT_DOUBLE_EQ(j["loop_sweep"][1]["loss"].get<double>(), val);
  const double loss1 = j["loop_sweep"][0]["loss"];
  // Below R the sweep reports the logit lens; check that against real one-loop forwards over the
  // same validation batches.
  EXPECT_EQ(j["logit_lens"][0]["loss"].get<double>(), loss1);
  {
    const std::string ckpt = (*root_ / "loop" / "checkpoint.bin").string();
    model::Config c;
    const std::unique_ptr<model::Model> loaded = train::load_model(ckpt, &c);
    model::Model& model = *loaded;
    const dataloader::TokenShard shard =
        dataloader::TokenShard::open(*root_ / "eval_test_data" / "val.bin");
    dataloader::BatchSampler sampler(shard, c.train.batch_size, c.model.seq_len, 0,
                                     dataloader::WindowOrder::kSpread);
    std::vector<int32_t> in(c.train.batch_size * c.model.seq_len), tg(in.size());
    double total = 0;
    for (int i = 0; i < o.batches; ++i) {
      sampler.next(in.data(), tg.data());
      total += model.forward(in.data(), tg.data(), c.train.batch_size, c.model.seq_len, 1).ce;
    }
    EXPECT_DOUBLE_EQ(total / o.batches, loss1);
    EXPECT_NE(loss1, val);
  }
  // A huge threshold halts every token after one iteration: that is the one-loop model. A tiny
  // one never halts: that is the full model.
  ASSERT_EQ(j["adaptive"].size(), 2u);
  EXPECT_EQ(j["adaptive"][0]["avg_iterations"], 1.0);
  EXPECT_DOUBLE_EQ(j["adaptive"][0]["loss"].get<double>(), loss1);
  EXPECT_EQ(j["adaptive"][1]["avg_iterations"], 2.0);
  EXPECT_DOUBLE_EQ(j["adaptive"][1]["loss"].get<double>(), val);
}

TEST_F(EvalTest, VanillaHasNoLoopFigures) {
  eval::EvalOptions o = options();
  o.halt_thresholds = {0.1};  // ignored: nothing to halt
  const json j = json::parse(eval::run_eval((*root_ / "vanilla").string(), o));
  ASSERT_EQ(j["loop_sweep"].size(), 1u);
  EXPECT_EQ(j["loop_sweep"][0]["loops"], 1);
  EXPECT_DOUBLE_EQ(j["loop_sweep"][0]["loss"].get<double>(), j["val_loss"].get<double>());
  ASSERT_EQ(j["logit_lens"].size(), 1u);
  EXPECT_DOUBLE_EQ(j["logit_lens"][0]["loss"].get<double>(), j["val_loss"].get<double>());
  EXPECT_TRUE(j["adaptive"].is_array());
  EXPECT_TRUE(j["adaptive"].empty());
}

TEST_F(EvalTest, RelativeDataDirResolvesAgainstTheRunsGrandparent) {
  // ROOT/runs/NAME with data.dir relative to ROOT, evaluated from elsewhere.
  const fs::path runs = *root_ / "runs";
  fs::create_directories(runs / "r");
  fs::copy_file(*root_ / "loop" / "checkpoint.bin", runs / "r" / "checkpoint.bin");
  model::Config c = train::read_checkpoint_config((runs / "r" / "checkpoint.bin").string());
  c.data.dir = "eval_test_data";
  EXPECT_EQ(eval::resolve_data_dir(c, runs / "r"), *root_ / "eval_test_data");
  EXPECT_EQ(eval::resolve_data_dir(c, runs / "r/"), *root_ / "eval_test_data");
  EXPECT_EQ(eval::resolve_data_dir(c, runs / "r", "elsewhere"), fs::path("elsewhere"));
  c.data.dir = "no_such_dir";
  EXPECT_THROW(eval::resolve_data_dir(c, runs / "r"), std::exception);
}

// The trainer's dataset check (dataloader::check_validation_shard): a shard whose vocabulary the
// model cannot embed fails before any work, naming the file.
TEST_F(EvalTest, ShardVocabularyAboveTheModelsIsADataError) {
  const fs::path dir = *root_ / "big_vocab";
  fs::create_directories(dir);
  std::vector<int32_t> tokens(200);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(i * 5 % 1000);
  const std::vector<uint64_t> offsets = {0, tokens.size()};
  dataloader::write_token_shard(dir / "val.bin", 1000, tokens, offsets);
  eval::EvalOptions o = options();
  o.data_dir = dir.string();
  try {
    eval::run_eval((*root_ / "loop").string(), o);
    ADD_FAILURE() << "no error";
  } catch (const dataloader::DataError& e) {
    EXPECT_EQ(std::string(e.what()),
              (dir / "val.bin").string() + ": shard vocabulary 1000 exceeds model.vocab_size 400");
  }
  fs::remove_all(dir);
}

TEST_F(EvalTest, TasksAreDeterministic) {
  const eval::EvalTasks a = eval::build_eval_tasks(docs(), tokenizer(), task_options());
  const eval::EvalTasks b = eval::build_eval_tasks(docs(), tokenizer(), task_options());
  std::ostringstream da, db;
  eval::write_tasks_jsonl(a, tokenizer(), da);
  eval::write_tasks_jsonl(b, tokenizer(), db);
  EXPECT_EQ(da.str(), db.str());
  EXPECT_EQ(a.cloze.size(), 12u);
  EXPECT_EQ(a.multiple_choice.size(), 12u);
  // The dump through the CLI's path is the same bytes again.
  const fs::path file = *root_ / "tasks.jsonl";
  eval::TaskOptions t = task_options();
  const auto counts = eval::dump_eval_tasks((*root_ / "loop").string(), t, "", file.string());
  EXPECT_EQ(counts.first, 12u);
  EXPECT_EQ(counts.second, 12u);
  EXPECT_EQ(read_all(file), da.str());
  // Every line is a JSON object.
  std::istringstream lines(da.str());
  std::string line;
  int n = 0;
  while (std::getline(lines, line)) {
    EXPECT_TRUE(json::parse(line).is_object());
    ++n;
  }
  EXPECT_EQ(n, 24);
  // Another seed picks other items.
  t.seed = 99;
  const eval::EvalTasks c = eval::build_eval_tasks(docs(), tokenizer(), t);
  std::ostringstream dc;
  eval::write_tasks_jsonl(c, tokenizer(), dc);
  EXPECT_NE(dc.str(), da.str());
}

TEST_F(EvalTest, TaskItemsAreWellFormed) {
  const std::vector<std::string> texts = docs();
  const dataloader::Tokenizer tok = tokenizer();
  eval::TaskOptions t = task_options();
  t.max_items = 1000;  // all of them
  const eval::EvalTasks tasks = eval::build_eval_tasks(texts, tok, t);
  ASSERT_GT(tasks.cloze.size(), 12u);
  ASSERT_GT(tasks.multiple_choice.size(), 12u);
  const int T = t.seq_len;
  for (const eval::ClozeItem& item : tasks.cloze) {
    const std::string& text = texts.at(item.doc);
    const eval::Sentence s = eval::split_sentences(text).at(item.sentence);
    const std::string sentence = text.substr(s.begin, s.end - s.begin);
    // The target is the sentence's real last word, its punctuation stripped.
    std::string last = sentence.substr(sentence.rfind(' ') + 1);
    while (!last.empty() && std::ispunct(static_cast<unsigned char>(last.back()))) last.pop_back();
    EXPECT_EQ(item.target, " " + last);
    EXPECT_EQ(item.target_ids, tok.encode(item.target));
    // Context + target fit the model and are exactly the document's text up to the word.
    EXPECT_LE(item.context.size() + item.target_ids.size(), static_cast<size_t>(T) + 1);
    std::vector<int32_t> all = item.context;
    all.insert(all.end(), item.target_ids.begin(), item.target_ids.end());
    const std::string up_to = text.substr(0, s.begin + sentence.rfind(' ') + item.target.size());
    std::vector<int32_t> want = tok.encode(up_to);
    want.insert(want.begin(), tok.eos_id());
    ASSERT_GE(want.size(), all.size());
    EXPECT_TRUE(std::equal(all.begin(), all.end(), want.end() - all.size()))
        << "doc " << item.doc << " sentence " << item.sentence;
  }
  for (const eval::ChoiceItem& item : tasks.multiple_choice) {
    ASSERT_EQ(item.choices.size(), 4u);
    ASSERT_EQ(item.choice_ids.size(), 4u);
    EXPECT_EQ(std::set<std::string>(item.choices.begin(), item.choices.end()).size(), 4u);
    ASSERT_GE(item.answer, 0);
    ASSERT_LT(item.answer, 4);
    const std::string& text = texts.at(item.doc);
    const std::vector<eval::Sentence> sentences = eval::split_sentences(text);
    const eval::Sentence next = sentences.at(item.sentence + 1);
    int correct = 0;
    for (int c = 0; c < 4; ++c) {
      EXPECT_EQ(item.choice_ids[c], tok.encode(item.choices[c]));
      EXPECT_LE(item.context.size() + item.choice_ids[c].size(), static_cast<size_t>(T) + 1);
      EXPECT_EQ(item.choices[c][0], ' ');
      EXPECT_GE(eval::count_words(item.choices[c]), t.min_words);
      correct += item.choices[c] == " " + text.substr(next.begin, next.end - next.begin);
    }
    EXPECT_EQ(correct, 1);  // distractors come from other documents and differ from the answer
    // The context ends with the item's sentence.
    const eval::Sentence own = sentences.at(item.sentence);
    const std::string decoded = tok.decode(item.context);
    const std::string own_text = text.substr(own.begin, own.end - own.begin);
    ASSERT_GE(decoded.size(), 4u);
    EXPECT_EQ(decoded.substr(decoded.size() - 4), own_text.substr(own_text.size() - 4));
  }
}

TEST(EvalTasksTest, SplitsSentences) {
  const std::string text =
      "Mr. Brown met Dr. Smith in the U.S. today. Did he? Yes! He said \"fine.\" Then  "
      "he left without a word";
  std::vector<std::string> got;
  for (const eval::Sentence& s : eval::split_sentences(text)) {
    got.push_back(text.substr(s.begin, s.end - s.begin));
  }
  const std::vector<std::string> want = {"Mr. Brown met Dr. Smith in the U.S. today.", "Did he?",
                                         "Yes!", "He said \"fine.\"",
                                         "Then  he left without a word"};
  EXPECT_EQ(got, want);
  EXPECT_EQ(eval::count_words(" a  b c "), 3);
  EXPECT_TRUE(eval::split_sentences("").empty());
}

TEST_F(EvalTest, BatchedScoringIgnoresPaddingAndNeighbours) {
  model::Config c;
  const std::unique_ptr<model::Model> loaded =
      train::load_model((*root_ / "loop" / "checkpoint.bin").string(), &c);
  model::Model& model = *loaded;
  const eval::EvalTasks tasks = eval::build_eval_tasks(docs(), tokenizer(), task_options());
  std::vector<eval::Request> requests;
  for (const eval::ChoiceItem& item : tasks.multiple_choice) {
    for (const auto& ids : item.choice_ids) requests.push_back({&item.context, &ids});
  }
  const int B = c.train.batch_size, T = c.model.seq_len;
  const std::vector<eval::RequestScore> together =
      eval::score_requests(model, requests, B, T, dataloader::kEosId);
  for (size_t i = 0; i < requests.size(); i += 7) {
    const std::vector<eval::RequestScore> alone =
        eval::score_requests(model, {requests[i]}, B, T, dataloader::kEosId);
    EXPECT_NEAR(alone[0].loglik, together[i].loglik, 1e-4 * std::abs(together[i].loglik));
    EXPECT_EQ(alone[0].greedy, together[i].greedy);
    EXPECT_LT(together[i].loglik, 0);
  }
}

}  // namespace
}  // namespace loopmoe
