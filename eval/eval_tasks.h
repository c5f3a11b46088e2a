// Zero-shot tasks built deterministically from the held-out (validation) documents, and their
// scoring by completion log-likelihood (docs/EVAL.md): a LAMBADA-style last-word cloze and a
// 4-way next-sentence multiple choice.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <iosfwd>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "model/config.h"

namespace loopmoe::model {
class Model;
}  // namespace loopmoe::model
namespace loopmoe::dataloader {
class TokenShard;
class Tokenizer;
}  // namespace loopmoe::dataloader

namespace loopmoe::eval {

// A sentence of a document's text: bytes [begin, end), without the separating space.
struct Sentence {
  size_t begin = 0;
  size_t end = 0;
};

// Splits normalized text (single spaces, as the tokenizer decodes it) into sentences: a sentence
// ends at '.', '?' or '!' (plus any closing quotes or brackets) followed by a space or the end
// of the text, except after a common abbreviation (Mr., Dr., ...), a single letter (an initial)
// or a word with an inner '.' (U.S.). The text after the last terminator is a final sentence.
std::vector<Sentence> split_sentences(std::string_view text);
// Words separated by spaces.
int count_words(std::string_view text);

// Texts of the held-out documents: each document of `val` without its eos, decoded.
std::vector<std::string> held_out_texts(const dataloader::TokenShard& val,
                                        const dataloader::Tokenizer& tokenizer);

struct TaskOptions {
  int seq_len = 128;     // model context: context + continuation fit seq_len + 1 tokens
  int max_items = 400;   // per task; chosen by hash rank when there are more candidates
  uint64_t seed = 1234;  // of every hash that selects items, distractors and answer positions
  int min_words = 5;     // sentences with fewer words are not used
};

struct ClozeItem {
  int doc = 0;                   // held-out document index
  int sentence = 0;              // sentence index within that document
  std::vector<int32_t> context;  // left-truncated to fit; may start with eos (document start)
  std::string target;            // " " + last word of the sentence, without punctuation
  std::vector<int32_t> target_ids;
};

struct ChoiceItem {
  int doc = 0;
  int sentence = 0;  // the context ends with this sentence; the answer is the next one
  std::vector<int32_t> context;
  std::vector<std::string> choices;  // 4 texts, each " " + a sentence
  std::vector<std::vector<int32_t>> choice_ids;
  int answer = 0;  // index of the true next sentence
};

struct EvalTasks {
  std::vector<ClozeItem> cloze;
  std::vector<ChoiceItem> multiple_choice;
};

EvalTasks build_eval_tasks(const std::vector<std::string>& docs,
                           const dataloader::Tokenizer& tokenizer, const TaskOptions& options);

// One JSON object per line, cloze items first: what the model sees (decoded context) and what it
// is scored on. Identical inputs give identical bytes.
void write_tasks_jsonl(const EvalTasks& tasks, const dataloader::Tokenizer& tokenizer,
                       std::ostream& out);

// A completion request: log P(continuation | context) under the model.
struct Request {
  const std::vector<int32_t>* context = nullptr;
  const std::vector<int32_t>* continuation = nullptr;
};
struct RequestScore {
  double loglik = 0;    // sum over the continuation's tokens of log p(token | prefix)
  bool greedy = false;  // every continuation token is the argmax at its position
};

// Scores requests in forwards of `batch` rows of `seq_len` tokens, one request per row (rows are
// right-padded with eos; padded positions are ignored, and causal attention keeps them from
// affecting the scored ones). The last forward is padded with eos rows so every forward has the
// same shape, which keeps the scores independent of how many requests there are.
// `progress`, if set, is called after every forward with (requests done, total).
std::vector<RequestScore> score_requests(
    model::Model& model, const std::vector<Request>& requests, int batch, int seq_len,
    int32_t pad_id, const std::function<void(size_t, size_t)>& progress = nullptr);

struct ClozeResult {
  int items = 0;
  double accuracy = 0;     // share of items whose every target token is the greedy argmax
  double target_loss = 0;  // mean negative log-likelihood per target token (over all items)
};
struct ChoiceResult {
  int items = 0;
  double accuracy = 0;       // argmax of summed log-likelihood is the answer
  double accuracy_norm = 0;  // argmax of log-likelihood per byte of the choice text is the answer
};

ClozeResult score_cloze(model::Model& model, const std::vector<ClozeItem>& items, int batch,
                        int seq_len, bool progress = false);
ChoiceResult score_multiple_choice(model::Model& model, const std::vector<ChoiceItem>& items,
                                   int batch, int seq_len, bool progress = false);

// Progress on stderr for score_requests and the evaluator; nullptr when disabled.
std::function<void(size_t, size_t)> progress_printer(const std::string& what, bool enabled);

// The dataset directory of a run: `override_dir` if set, else config.data.dir; a relative path is
// tried against the current directory first, then against the run directory's grandparent (runs
// live in ROOT/runs/NAME and configs name data relative to ROOT).
std::filesystem::path resolve_data_dir(const model::Config& config,
                                       const std::filesystem::path& run_dir,
                                       const std::string& override_dir = "");

// Builds the tasks of a run (its checkpoint's seq_len, its dataset's val.bin and tokenizer) and
// writes them as JSON lines to `out_file`. Returns {cloze items, multiple-choice items}.
std::pair<size_t, size_t> dump_eval_tasks(const std::string& run_dir, const TaskOptions& options,
                                          const std::string& data_dir_override,
                                          const std::string& out_file);

}  // namespace loopmoe::eval
