#include "eval/eval_tasks.h"

#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <iterator>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <tuple>

#include "common/atomic_file.h"
#include "dataloader/data_error.h"
#include "dataloader/token_shard.h"
#include "dataloader/tokenizer.h"
#include "model/error.h"
#include "model/model.h"
#include "train/checkpoint.h"

namespace loopmoe::eval {
namespace {

namespace fs = std::filesystem;

// Words after which a '.' does not end a sentence ("Mr. Speaker" is one sentence).
bool is_abbreviation(std::string_view word) {
  static constexpr std::string_view kAbbreviations[] = {
      "Mr",   "Mrs", "Ms", "Dr",  "Jr",  "Sr", "St", "Gen", "Gov",  "Sen", "Rep", "Hon", "Messrs",
      "Capt", "Col", "Lt", "Maj", "Sgt", "Mt", "Ft", "Co",  "Corp", "Inc", "Ltd", "vs",  "viz"};
  while (!word.empty() && (word.front() == '"' || word.front() == '(' || word.front() == '\'')) {
    word.remove_prefix(1);
  }
  if (word.size() == 1 && std::isalpha(static_cast<unsigned char>(word[0]))) return true;
  if (word.find('.') != std::string_view::npos) return true;  // U.S., D.C.
  return std::find(std::begin(kAbbreviations), std::end(kAbbreviations), word) !=
         std::end(kAbbreviations);
}

// Length of a closing quote or bracket at text[i], 0 if there is none.
size_t closer_length(std::string_view text, size_t i) {
  const char c = text[i];
  if (c == '"' || c == '\'' || c == ')' || c == ']') return 1;
  // ’ and ” (U+2019, U+201D) in UTF-8.
  if (text.substr(i, 3) == "\xE2\x80\x99" || text.substr(i, 3) == "\xE2\x80\x9D") return 3;
  return 0;
}

// " " + text. (Built by append: GCC 12 warns falsely, -Wrestrict, on `" " + std::string(...)`.)
std::string with_space(std::string_view text) {
  std::string out;
  out.reserve(text.size() + 1);
  out += ' ';
  out.append(text);
  return out;
}

uint64_t hash_key(const std::string& key, uint64_t seed) {
  return XXH64(key.data(), key.size(), seed);
}

// " " + word without trailing punctuation, or "" when the word is not a plain word (letters with
// inner apostrophes or hyphens): a cloze target must be something a reader can guess as a word.
std::string cloze_target(std::string_view word) {
  while (!word.empty()) {
    const size_t n = word.size();
    if (std::ispunct(static_cast<unsigned char>(word.back()))) {
      word.remove_suffix(1);
    } else if (n >= 3 && closer_length(word, n - 3) == 3) {
      word.remove_suffix(3);
    } else {
      break;
    }
  }
  if (word.empty()) return "";
  auto letter = [](char c) { return std::isalpha(static_cast<unsigned char>(c)) != 0; };
  if (!letter(word.front()) || !letter(word.back())) return "";
  for (char c : word) {
    if (!letter(c) && c != '\'' && c != '-') return "";
  }
  return with_space(word);
}

// The last `budget` tokens of text[0, end), starting with eos when they reach the document start
// (in training every document follows an eos). Only a window of the text is encoded: it starts
// at a word boundary, and pieces never span whitespace, so its ids equal the tail of the whole
// prefix's ids. The window doubles until it holds enough tokens.
std::vector<int32_t> context_before(const std::string& text, size_t end, int budget,
                                    const dataloader::Tokenizer& tokenizer) {
  size_t window = 8 * static_cast<size_t>(std::max(budget, 1));
  std::vector<int32_t> ids;
  while (true) {
    size_t begin = end > window ? end - window : 0;
    if (begin > 0) {
      const size_t space = text.find(' ', begin);
      begin = space == std::string::npos || space >= end ? end : space + 1;
    }
    ids = tokenizer.encode(std::string_view(text).substr(begin, end - begin));
    if (begin == 0) ids.insert(ids.begin(), tokenizer.eos_id());
    if (begin == 0 || ids.size() >= static_cast<size_t>(budget)) break;
    window *= 2;
  }
  if (ids.size() > static_cast<size_t>(budget)) ids.erase(ids.begin(), ids.end() - budget);
  return ids;
}

// Candidates sorted by hash rank; ties (never in practice) by position.
struct Candidate {
  uint64_t rank;
  int doc, sentence;
  bool operator<(const Candidate& o) const {
    return std::tie(rank, doc, sentence) < std::tie(o.rank, o.doc, o.sentence);
  }
};

template <typename Item>
void sort_by_position(std::vector<Item>& items) {
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return std::tie(a.doc, a.sentence) < std::tie(b.doc, b.sentence);
  });
}

}  // namespace

std::vector<Sentence> split_sentences(std::string_view text) {
  std::vector<Sentence> out;
  const size_t n = text.size();
  size_t start = 0;
  auto skip_spaces = [&](size_t i) {
    while (i < n && text[i] == ' ') ++i;
    return i;
  };
  auto emit = [&](size_t end) {
    while (end > start && text[end - 1] == ' ') --end;
    if (end > start) out.push_back({start, end});
  };
  start = skip_spaces(0);
  for (size_t i = start; i < n; ++i) {
    const char c = text[i];
    if (c != '.' && c != '?' && c != '!') continue;
    size_t j = i + 1;
    while (j < n) {
      const size_t len = closer_length(text, j);
      if (len == 0) break;
      j += len;
    }
    if (j < n && text[j] != ' ') continue;
    if (c == '.') {
      const size_t word_start = text.rfind(' ', i);
      const size_t ws = word_start == std::string_view::npos ? 0 : word_start + 1;
      if (ws >= start && is_abbreviation(text.substr(ws, i - ws))) continue;
    }
    emit(j);
    start = skip_spaces(j);
    i = start - 1;  // the loop's ++i lands on start
    if (start >= n) break;
  }
  if (start < n) emit(n);
  return out;
}

int count_words(std::string_view text) {
  int words = 0;
  bool in_word = false;
  for (char c : text) {
    const bool space = c == ' ';
    words += !space && !in_word;
    in_word = !space;
  }
  return words;
}

std::vector<std::string> held_out_texts(const dataloader::TokenShard& val,
                                        const dataloader::Tokenizer& tokenizer) {
  std::vector<std::string> texts;
  std::vector<int32_t> ids;
  for (uint64_t d = 0; d < val.num_docs(); ++d) {
    const dataloader::DocRange range = val.doc_range(d);
    ids.resize(range.end - range.begin);
    val.read(range.begin, ids.size(), ids.data());
    if (!ids.empty() && ids.back() == tokenizer.eos_id()) ids.pop_back();
    texts.push_back(tokenizer.decode(ids));
  }
  return texts;
}

EvalTasks build_eval_tasks(const std::vector<std::string>& docs,
                           const dataloader::Tokenizer& tokenizer, const TaskOptions& options) {
  if (options.seq_len < 4) throw std::invalid_argument("eval tasks: seq_len must be at least 4");
  const int max_piece = options.seq_len / 2;  // a target or choice takes at most half the context
  EvalTasks tasks;
  std::vector<std::vector<Sentence>> sentences;
  for (const std::string& text : docs) sentences.push_back(split_sentences(text));
  auto sentence_text = [&](int d, int s) {
    const Sentence& x = sentences[d][s];
    return std::string_view(docs[d]).substr(x.begin, x.end - x.begin);
  };
  auto tag = [](const char* task, int d, int s) {
    return std::string(task) + "#" + std::to_string(d) + "#" + std::to_string(s);
  };

  // Cloze: every sentence of enough words whose last word is a plain word.
  std::vector<Candidate> cloze;
  for (int d = 0; d < static_cast<int>(docs.size()); ++d) {
    for (int s = 0; s < static_cast<int>(sentences[d].size()); ++s) {
      const std::string_view st = sentence_text(d, s);
      if (count_words(st) < options.min_words) continue;
      if (cloze_target(st.substr(st.rfind(' ') + 1)).empty()) continue;
      cloze.push_back({hash_key(tag("cloze", d, s), options.seed), d, s});
    }
  }
  std::sort(cloze.begin(), cloze.end());
  for (const Candidate& c : cloze) {
    if (static_cast<int>(tasks.cloze.size()) >= options.max_items) break;
    const std::string_view st = sentence_text(c.doc, c.sentence);
    const size_t space = st.rfind(' ');
    ClozeItem item;
    item.doc = c.doc;
    item.sentence = c.sentence;
    item.target = cloze_target(st.substr(space + 1));
    item.target_ids = tokenizer.encode(item.target);
    if (item.target_ids.empty() || static_cast<int>(item.target_ids.size()) > max_piece) continue;
    const size_t context_end = sentences[c.doc][c.sentence].begin + space;  // before the space
    item.context =
        context_before(docs[c.doc], context_end,
                       options.seq_len + 1 - static_cast<int>(item.target_ids.size()), tokenizer);
    tasks.cloze.push_back(std::move(item));
  }
  sort_by_position(tasks.cloze);

  // Multiple choice. Choice texts are " " + sentence, as they continue the running text.
  struct PoolEntry {
    int doc, sentence;
  };
  std::vector<PoolEntry> pool;  // sentences usable as a choice, in document order
  std::vector<std::vector<std::vector<int32_t>>> choice_ids(docs.size());
  for (int d = 0; d < static_cast<int>(docs.size()); ++d) {
    choice_ids[d].resize(sentences[d].size());
    for (int s = 0; s < static_cast<int>(sentences[d].size()); ++s) {
      const std::string_view st = sentence_text(d, s);
      if (count_words(st) < options.min_words) continue;
      choice_ids[d][s] = tokenizer.encode(with_space(st));
      if (static_cast<int>(choice_ids[d][s].size()) <= max_piece) pool.push_back({d, s});
    }
  }
  auto usable = [&](int d, int s) {
    return !choice_ids[d][s].empty() && static_cast<int>(choice_ids[d][s].size()) <= max_piece;
  };
  // Distractors come from other documents; with a single usable document (tiny corpora), from
  // its other sentences.
  const bool single_doc = std::all_of(pool.begin(), pool.end(),
                                      [&](const PoolEntry& e) { return e.doc == pool[0].doc; });
  std::vector<Candidate> mc;
  for (int d = 0; d < static_cast<int>(docs.size()); ++d) {
    for (int s = 0; s + 1 < static_cast<int>(sentences[d].size()); ++s) {
      if (count_words(sentence_text(d, s)) < options.min_words || !usable(d, s + 1)) continue;
      mc.push_back({hash_key(tag("mc", d, s), options.seed), d, s});
    }
  }
  std::sort(mc.begin(), mc.end());
  for (const Candidate& c : mc) {
    if (static_cast<int>(tasks.multiple_choice.size()) >= options.max_items) break;
    const std::string truth = with_space(sentence_text(c.doc, c.sentence + 1));
    std::vector<PoolEntry> picked;
    std::vector<std::string> texts = {truth};
    for (int attempt = 0; picked.size() < 3 && attempt < 1000 && !pool.empty(); ++attempt) {
      const std::string key = tag("mc", c.doc, c.sentence) + "#" + std::to_string(attempt);
      const PoolEntry& e = pool[hash_key(key, options.seed) % pool.size()];
      const bool allowed =
          single_doc ? (e.sentence != c.sentence && e.sentence != c.sentence + 1) : e.doc != c.doc;
      if (!allowed) continue;
      const std::string text = with_space(sentence_text(e.doc, e.sentence));
      if (std::find(texts.begin(), texts.end(), text) != texts.end()) continue;
      picked.push_back(e);
      texts.push_back(text);
    }
    if (picked.size() < 3) continue;  // not enough distinct sentences (degenerate corpus)
    ChoiceItem item;
    item.doc = c.doc;
    item.sentence = c.sentence;
    item.answer =
        static_cast<int>(hash_key(tag("mc", c.doc, c.sentence) + "#answer", options.seed) % 4);
    for (int i = 0, next = 0; i < 4; ++i) {
      const PoolEntry e = i == item.answer ? PoolEntry{c.doc, c.sentence + 1} : picked[next++];
      item.choices.push_back(with_space(sentence_text(e.doc, e.sentence)));
      item.choice_ids.push_back(choice_ids[e.doc][e.sentence]);
    }
    size_t longest = 0;
    for (const auto& ids : item.choice_ids) longest = std::max(longest, ids.size());
    // One context for all four choices, short enough for the longest, so they are compared
    // under the same conditioning.
    item.context = context_before(docs[c.doc], sentences[c.doc][c.sentence].end,
                                  options.seq_len + 1 - static_cast<int>(longest), tokenizer);
    tasks.multiple_choice.push_back(std::move(item));
  }
  sort_by_position(tasks.multiple_choice);
  return tasks;
}

void write_tasks_jsonl(const EvalTasks& tasks, const dataloader::Tokenizer& tokenizer,
                       std::ostream& out) {
  using Json = nlohmann::ordered_json;
  auto line = [&](const Json& j) {
    out << j.dump(-1, ' ', false, Json::error_handler_t::replace) << "\n";
  };
  auto starts_document = [&](const std::vector<int32_t>& ctx) {
    return !ctx.empty() && ctx[0] == tokenizer.eos_id();
  };
  for (const ClozeItem& item : tasks.cloze) {
    Json j;
    j["task"] = "cloze";
    j["doc"] = item.doc;
    j["sentence"] = item.sentence;
    j["context_starts_document"] = starts_document(item.context);
    j["context_tokens"] = item.context.size();
    j["context"] = tokenizer.decode(item.context);
    j["target"] = item.target;
    j["target_tokens"] = item.target_ids.size();
    line(j);
  }
  for (const ChoiceItem& item : tasks.multiple_choice) {
    Json j;
    j["task"] = "multiple_choice";
    j["doc"] = item.doc;
    j["sentence"] = item.sentence;
    j["context_starts_document"] = starts_document(item.context);
    j["context_tokens"] = item.context.size();
    j["context"] = tokenizer.decode(item.context);
    j["choices"] = item.choices;
    Json lengths = Json::array();
    for (const auto& ids : item.choice_ids) lengths.push_back(ids.size());
    j["choice_tokens"] = lengths;
    j["answer"] = item.answer;
    line(j);
  }
}

std::vector<RequestScore> score_requests(model::Model& model, const std::vector<Request>& requests,
                                         int batch, int seq_len, int32_t pad_id,
                                         const std::function<void(size_t, size_t)>& progress) {
  const int T = seq_len, V = model.config().vocab_size;
  std::vector<RequestScore> scores(requests.size());
  std::vector<int32_t> tokens(static_cast<size_t>(batch) * T);
  for (size_t first = 0; first < requests.size(); first += batch) {
    const size_t rows = std::min<size_t>(batch, requests.size() - first);
    std::fill(tokens.begin(), tokens.end(), pad_id);
    for (size_t b = 0; b < rows; ++b) {
      const Request& r = requests[first + b];
      const size_t nc = r.context->size(), nt = r.continuation->size();
      if (nc == 0 || nt == 0 || nc + nt > static_cast<size_t>(T) + 1) {
        throw std::invalid_argument("score_requests: request does not fit seq_len");
      }
      // The input is context + continuation without its last token (which is only predicted).
      int32_t* row = tokens.data() + b * T;
      std::copy(r.context->begin(), r.context->end(), row);
      std::copy(r.continuation->begin(), r.continuation->end() - 1, row + nc);
    }
    model.forward(tokens.data(), nullptr, batch, T);
    // A host copy: the model's logits may be device memory (model.h).
    const std::vector<float> logits = model.logits_to_host();
    // Rows are independent and each is summed serially, so threads do not change the result.
#pragma omp parallel for schedule(static)
    for (size_t b = 0; b < rows; ++b) {
      const Request& r = requests[first + b];
      RequestScore& score = scores[first + b];
      score.greedy = true;
      for (size_t j = 0; j < r.continuation->size(); ++j) {
        const size_t pos = r.context->size() - 1 + j;  // position whose output predicts token j
        const float* z = logits.data() + (b * T + pos) * static_cast<size_t>(V);
        const int32_t target = (*r.continuation)[j];
        int argmax = 0;
        for (int v = 1; v < V; ++v) argmax = z[v] > z[argmax] ? v : argmax;
        double sum = 0;
        for (int v = 0; v < V; ++v) sum += std::exp(static_cast<double>(z[v]) - z[argmax]);
        score.loglik += static_cast<double>(z[target]) - z[argmax] - std::log(sum);
        score.greedy = score.greedy && argmax == target;
      }
    }
    if (progress) progress(first + rows, requests.size());
  }
  return scores;
}

std::function<void(size_t, size_t)> progress_printer(const std::string& what, bool enabled) {
  if (!enabled) return nullptr;
  // On a terminal one line updates in place; in a log, only the start and the end appear.
  const bool tty = isatty(STDERR_FILENO);
  return [what, tty](size_t done, size_t total) {
    if (tty) {
      std::fprintf(stderr, "\r%s: %zu/%zu%s", what.c_str(), done, total, done == total ? "\n" : "");
    } else if (done == total) {
      std::fprintf(stderr, "%s: %zu/%zu done\n", what.c_str(), done, total);
    }
  };
}

ClozeResult score_cloze(model::Model& model, const std::vector<ClozeItem>& items, int batch,
                        int seq_len, bool progress) {
  std::vector<Request> requests;
  for (const ClozeItem& item : items) requests.push_back({&item.context, &item.target_ids});
  const std::vector<RequestScore> scores =
      score_requests(model, requests, batch, seq_len, dataloader::kEosId,
                     progress_printer("cloze requests", progress));
  ClozeResult result;
  result.items = static_cast<int>(items.size());
  double nll = 0;
  size_t tokens = 0, correct = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    nll -= scores[i].loglik;
    tokens += items[i].target_ids.size();
    correct += scores[i].greedy;
  }
  if (!items.empty()) {
    result.accuracy = static_cast<double>(correct) / items.size();
    result.target_loss = nll / tokens;
  }
  return result;
}

ChoiceResult score_multiple_choice(model::Model& model, const std::vector<ChoiceItem>& items,
                                   int batch, int seq_len, bool progress) {
  std::vector<Request> requests;
  for (const ChoiceItem& item : items) {
    for (const auto& ids : item.choice_ids) requests.push_back({&item.context, &ids});
  }
  const std::vector<RequestScore> scores =
      score_requests(model, requests, batch, seq_len, dataloader::kEosId,
                     progress_printer("multiple-choice requests", progress));
  ChoiceResult result;
  result.items = static_cast<int>(items.size());
  size_t correct = 0, correct_norm = 0, k = 0;
  for (const ChoiceItem& item : items) {
    int best = 0, best_norm = 0;
    std::vector<double> norm(item.choices.size());
    for (size_t c = 0; c < item.choices.size(); ++c) {
      norm[c] = scores[k + c].loglik / static_cast<double>(item.choices[c].size());
      if (scores[k + c].loglik > scores[k + best].loglik) best = static_cast<int>(c);
      if (norm[c] > norm[best_norm]) best_norm = static_cast<int>(c);
    }
    k += item.choices.size();
    correct += best == item.answer;
    correct_norm += best_norm == item.answer;
  }
  if (!items.empty()) {
    result.accuracy = static_cast<double>(correct) / items.size();
    result.accuracy_norm = static_cast<double>(correct_norm) / items.size();
  }
  return result;
}

fs::path resolve_data_dir(const model::Config& config, const fs::path& run_dir,
                          const std::string& override_dir) {
  if (!override_dir.empty()) return override_dir;
  const fs::path dir(config.data.dir);
  // A candidate counts only if it holds a validation shard, so an unrelated directory of the same
  // name in the current directory does not shadow the run's dataset.
  if (dir.is_absolute() || fs::exists(dir / "val.bin")) return dir;
  // RUN may be spelled with a trailing slash; its grandparent is the project root.
  fs::path run = fs::absolute(run_dir).lexically_normal();
  if (run.filename().empty()) run = run.parent_path();
  const fs::path beside = run.parent_path().parent_path() / dir;
  if (fs::exists(beside / "val.bin")) return beside;
  throw model::ConfigError("data.dir \"" + config.data.dir + "\" of " + run_dir.string() +
                           " not found (no val.bin in " + fs::absolute(dir).string() + " or " +
                           beside.string() + "); pass --data DIR");
}

std::pair<size_t, size_t> dump_eval_tasks(const std::string& run_dir, const TaskOptions& options,
                                          const std::string& data_dir_override,
                                          const std::string& out_file) {
  const model::Config config =
      train::read_checkpoint_config((fs::path(run_dir) / "checkpoint.bin").string());
  const fs::path data_dir = resolve_data_dir(config, run_dir, data_dir_override);
  const dataloader::Tokenizer tokenizer = dataloader::Tokenizer::load(data_dir / "tokenizer.model");
  const dataloader::TokenShard val = dataloader::TokenShard::open(data_dir / "val.bin");
  TaskOptions o = options;
  o.seq_len = config.model.seq_len;
  const EvalTasks tasks = build_eval_tasks(held_out_texts(val, tokenizer), tokenizer, o);
  std::ostringstream text;
  write_tasks_jsonl(tasks, tokenizer, text);
  // Written whole and renamed, so an interrupted dump never leaves half a file.
  common::write_file_atomically(out_file, text.str(), [](const common::WriteFailure& f) {
    if (f.step == common::WriteStep::kCreate) {
      throw std::runtime_error(f.path.string() + ": cannot open for writing");
    }
    if (f.step == common::WriteStep::kWrite) {
      throw std::runtime_error(f.path.string() + ": write failed");
    }
    throw std::runtime_error(f.message());
  });
  return {tasks.cloze.size(), tasks.multiple_choice.size()};
}

}  // namespace loopmoe::eval
