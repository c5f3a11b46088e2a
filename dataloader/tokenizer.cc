#include "dataloader/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <string>
#include <unordered_map>
#include <utility>

#include "common/atomic_file.h"
#include "common/text_file.h"
#include "dataloader/file_util.h"

namespace loopmoe::dataloader {
namespace {

// Sentencepiece trains on "sentences" and drops any longer than max_sentence_length, but a
// document may be one 200 KB line (the SOTU files are). BPE never merges across whitespace, so
// cutting at whitespace loses nothing; we cut at kChunkBytes and allow sentencepiece a bit more.
constexpr size_t kChunkBytes = 4096;
constexpr int kMaxSentenceLength = 8192;

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f'; }

bool blank(std::string_view s) {
  for (char c : s) {
    if (!is_space(c)) return false;
  }
  return true;
}

// Appends the chunks of one document: its lines, with long lines cut at whitespace. A run of
// more than kChunkBytes without whitespace stays whole: cutting it would give its second half a
// word-start piece and so change the ids (training simply skips such an overlong chunk).
void append_chunks(std::string_view doc, std::vector<std::string_view>* out) {
  while (!doc.empty()) {
    const size_t nl = doc.find('\n');
    std::string_view line = doc.substr(0, nl);
    doc = nl == std::string_view::npos ? std::string_view() : doc.substr(nl + 1);
    while (line.size() > kChunkBytes) {
      size_t cut = kChunkBytes;
      while (cut > 0 && !is_space(line[cut])) --cut;
      if (cut == 0) {
        cut = kChunkBytes;
        while (cut < line.size() && !is_space(line[cut])) ++cut;
      }
      if (!blank(line.substr(0, cut))) out->push_back(line.substr(0, cut));
      line = line.substr(cut);
    }
    if (!blank(line)) out->push_back(line);
  }
}

class ChunkIterator : public sentencepiece::SentenceIterator {
 public:
  explicit ChunkIterator(const std::vector<std::string_view>& chunks) : chunks_(chunks) { load(); }
  bool done() const override { return i_ >= chunks_.size(); }
  void Next() override {
    ++i_;
    load();
  }
  const std::string& value() const override { return value_; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  void load() {
    if (!done()) value_.assign(chunks_[i_]);
  }

  const std::vector<std::string_view>& chunks_;
  size_t i_ = 0;
  std::string value_;
};

[[noreturn]] void fail(const std::string& origin, const std::string& what) {
  throw DataError(origin + ": " + what);
}

}  // namespace

Tokenizer::Tokenizer(std::string serialized, std::string origin)
    : serialized_(std::move(serialized)),
      origin_(std::move(origin)),
      sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  const auto status = sp_->LoadFromSerializedProto(serialized_);
  if (!status.ok()) fail(origin_, std::string("not a sentencepiece model: ") + status.message());
  if (sp_->eos_id() < 0) fail(origin_, "sentencepiece model has no eos piece to end documents");
}

Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::filesystem::path& model_file) {
  return Tokenizer(common::read_text_as<DataError>(model_file), model_file.string());
}

Tokenizer Tokenizer::train(const std::vector<std::string_view>& documents,
                           const TokenizerTrainOptions& options) {
  const std::string origin = "tokenizer training";
  if (options.vocab_size < kMinVocabSize) {
    fail(origin, "vocab " + std::to_string(options.vocab_size) +
                     " is too small: byte fallback and unk/bos/eos alone take 259 pieces; use at "
                     "least " +
                     std::to_string(kMinVocabSize) + " (plus one per distinct character)");
  }
  std::vector<std::string_view> chunks;
  for (std::string_view doc : documents) append_chunks(doc, &chunks);
  if (chunks.empty()) fail(origin, "no text to train on");

  sentencepiece::SetRandomGeneratorSeed(options.seed);
  const std::unordered_map<std::string, std::string> args = {
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(options.vocab_size)},
      {"character_coverage", std::to_string(options.character_coverage)},
      {"byte_fallback", "true"},
      {"input_sentence_size", std::to_string(options.max_sentences)},
      {"shuffle_input_sentence", "false"},
      {"max_sentence_length", std::to_string(kMaxSentenceLength)},
      {"num_threads", "1"},
      {"unk_id", std::to_string(kUnkId)},
      {"bos_id", std::to_string(kBosId)},
      {"eos_id", std::to_string(kEosId)},
      {"pad_id", "-1"},
      // Sentencepiece's INFO lines would drown our progress output; warnings still show.
      {"minloglevel", "1"},
  };
  ChunkIterator it(chunks);
  std::string model;
  const auto status = sentencepiece::SentencePieceTrainer::Train(args, &it, &model);
  if (!status.ok()) fail(origin, std::string("sentencepiece failed: ") + status.message());

  Tokenizer tok(std::move(model), "trained tokenizer");
  if (tok.vocab_size() != options.vocab_size) {
    fail(origin, "corpus too small: sentencepiece learned only " +
                     std::to_string(tok.vocab_size()) + " of " +
                     std::to_string(options.vocab_size) + " pieces; lower --vocab");
  }
  return tok;
}

int Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }

int32_t Tokenizer::eos_id() const { return sp_->eos_id(); }

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  // Encoding whitespace-cut chunks gives the same ids as encoding the whole text (pieces never
  // span whitespace, and the normalizer folds every run of it into one piece boundary) but runs
  // about twice as fast on long single-line documents.
  std::vector<std::string_view> chunks;
  append_chunks(text, &chunks);
  std::vector<int32_t> out;
  out.reserve(text.size() / 3);
  std::vector<int> ids;
  for (std::string_view chunk : chunks) {
    const auto status = sp_->Encode(chunk, &ids);
    if (!status.ok()) fail(origin_, std::string("encode failed: ") + status.message());
    out.insert(out.end(), ids.begin(), ids.end());
  }
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  const std::vector<int> v(ids.begin(), ids.end());
  std::string text;
  const auto status = sp_->Decode(v, &text);
  if (!status.ok()) fail(origin_, std::string("decode failed: ") + status.message());
  return text;
}

void Tokenizer::save(const std::filesystem::path& path) const {
  common::write_file_atomically(path, serialized_, throw_data_error);
}

}  // namespace loopmoe::dataloader
