// SentencePiece BPE tokenizer: training (deterministic) and encode/decode.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "dataloader/data_error.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace loopmoe::dataloader {

// SentencePiece's default special ids, which our training keeps; eos terminates every document.
inline constexpr int32_t kUnkId = 0;
inline constexpr int32_t kBosId = 1;
inline constexpr int32_t kEosId = 2;

// Byte fallback adds one piece per byte value; with unk/bos/eos that is the floor below which
// sentencepiece cannot train a model at all (it also needs one piece per required character).
inline constexpr int kMinVocabSize = 256 + 3 + 1;

struct TokenizerTrainOptions {
  int vocab_size = 4096;
  double character_coverage = 0.9995;
  // Bound on training sentences (documents are cut into chunks of at most a few KiB at
  // whitespace); the first ones are taken, in order, so the choice is deterministic.
  int64_t max_sentences = 4'000'000;
  uint32_t seed = 1234;  // sentencepiece's global RNG; unused by BPE without shuffling
};

class Tokenizer {
 public:
  // Loads a serialized sentencepiece model (e.g. DIR/tokenizer.model).
  static Tokenizer load(const std::filesystem::path& model_file);
  // Trains a BPE model (byte fallback, unk=0 bos=1 eos=2) on `documents`. Single-threaded and
  // without shuffling, so the same documents give a byte-identical model.
  static Tokenizer train(const std::vector<std::string_view>& documents,
                         const TokenizerTrainOptions& options);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  int vocab_size() const;
  int32_t eos_id() const;
  // Ids of `text` without any bos/eos.
  std::vector<int32_t> encode(std::string_view text) const;
  std::string decode(std::span<const int32_t> ids) const;
  // The model file's bytes; save() writes exactly these.
  const std::string& serialized_model() const { return serialized_; }
  void save(const std::filesystem::path& path) const;

 private:
  Tokenizer(std::string serialized, std::string origin);

  std::string serialized_;
  std::string origin_;  // file name or "trained model", for error messages
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
};

}  // namespace loopmoe::dataloader
