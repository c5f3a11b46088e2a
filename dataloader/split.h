// The train/validation split of `data prepare` (docs/DATA.md "The split rule"): the units it
// splits, the rule with its two fallbacks, and the validation top-up. Private to dataloader/; the
// public part (is_validation_doc, is_validation_chunk, cut_document) is declared in prepare.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace loopmoe::dataloader::split_internal {

// One input file of `data prepare`; documents are views into `text`.
struct Source {
  std::filesystem::path path;
  std::string name;  // base name: what the split hashes
  std::string text;
  uint64_t train_docs = 0;
  uint64_t val_docs = 0;
};

// A unit of the split: a whole document, or one chunk of a document that was cut.
struct Doc {
  size_t source;
  uint64_t index;  // the document's, within its source
  int64_t chunk;   // -1: the whole document; else the chunk's index within it
  std::string_view text;
  double score;
  bool val;
};

// The split rule over `docs` (in place): val iff the key's score is below val_fraction, with the
// two fallbacks that give each side a unit whenever there are two. Returns the validation count.
size_t split_units(std::vector<Doc>& docs, const std::vector<Source>& sources, uint64_t seed,
                   double val_fraction);

// Bytes of text on the validation side.
uint64_t val_bytes(const std::vector<Doc>& docs);

// After a chunked split: while validation holds fewer than kMinValBytes, the train unit with the
// smallest score moves to validation, as long as train keeps at least as much text as
// validation. Returns how many moved.
size_t top_up_validation(std::vector<Doc>& docs);

}  // namespace loopmoe::dataloader::split_internal
