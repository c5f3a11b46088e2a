// The train/validation split of `data prepare` (docs/DATA.md "The split rule"): the units it
// splits, the rule with its two fallbacks, and the validation top-up. Private to dataloader/; the
// public part (is_validation_doc, is_validation_chunk, cut_document) is declared in prepare.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace loopmoe::dataloader {
struct PrepareResult;
}  // namespace loopmoe::dataloader

namespace loopmoe::dataloader::split_internal {

// One input file of `data prepare`; documents are views into `text`.
struct Source {
  std::filesystem::path path;
  std::string name;   // base name: what the split hashes
  size_t domain = 0;  // index into the domains (prepare.cc): the file's directory
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

// The two fallbacks of the rule over units already scored (num_val of them on the validation
// side): with at least two units and an empty side, the unit with the smallest score moves to
// validation, or the one with the largest to train. Returns the new validation count.
size_t apply_fallbacks(std::vector<Doc>& docs, size_t num_val);

// Bytes of text on the validation side.
uint64_t val_bytes(const std::vector<Doc>& docs);

// After a chunked split: while validation holds fewer than kMinValBytes, the train unit with the
// smallest score moves to validation, as long as train keeps at least as much text as
// validation. Returns how many moved.
size_t top_up_validation(std::vector<Doc>& docs);

// Splits one domain's units in place (docs/DATA.md "The split rule"): split_units; then, when
// the units are too few for the fraction (n * val_fraction < 1) or validation would hold fewer
// than kMinValBytes, the documents over kChunkBytes are cut into chunks, the split is redone over
// the pieces (documents not cut keep their key) and validation is topped up. Adds what it cut to
// result's chunk counters and logs it through `say`, prefixed by `label`. Returns the
// validation count.
size_t split_domain(std::vector<Doc>& docs, const std::vector<Source>& sources, uint64_t seed,
                    double val_fraction, const std::string& label, PrepareResult& result,
                    const std::function<void(const std::string&)>& say);

}  // namespace loopmoe::dataloader::split_internal
