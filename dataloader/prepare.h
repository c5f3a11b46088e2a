// `data prepare`: text files -> tokenizer + train/val token shards + meta.json.
#pragma once

#include <cstdint>
#include <filesystem>
#include <iosfwd>
#include <string>
#include <string_view>
#include <vector>

#include "dataloader/token_shard.h"

namespace loopmoe::dataloader {

struct PrepareOptions {
  // Files, or directories whose *.txt files are taken (not recursive). The union is sorted by
  // path, so the order given does not matter.
  std::vector<std::filesystem::path> inputs;
  std::filesystem::path out_dir;
  int vocab_size = 0;                     // required unless tokenizer_model is set
  std::filesystem::path tokenizer_model;  // empty: train a BPE model on the train split
  double val_fraction = 0.05;             // in (0, 1)
  uint64_t seed = 1234;
  bool docs_per_line = false;  // each non-blank line is a document instead of each file
  int threads = 0;             // encoding threads (0: every core); the output does not depend on it
  std::ostream* log = nullptr;  // progress lines; nullptr is quiet
};

struct PrepareResult {
  uint32_t vocab_size = 0;
  uint64_t num_files = 0;
  uint64_t input_bytes = 0;
  uint64_t train_docs = 0, train_tokens = 0;  // documents as the shards hold them
  uint64_t val_docs = 0, val_tokens = 0;
  uint64_t chunked_docs = 0;     // long documents cut into chunks for the split (0: none)
  uint64_t chunks = 0;           // the non-blank chunks they gave
  uint64_t val_chunks = 0;       // of those, how many went to validation
  double tokenizer_seconds = 0;  // training or loading
  double encode_seconds = 0;
  double total_seconds = 0;
};

// Writes out_dir/{tokenizer.model, train.bin, val.bin, meta.json}; each file atomically. The
// same inputs, options and seed give byte-identical files. The validation split is never empty:
// when documents are too few or validation too small (see kChunkBytes), long documents are cut
// into chunks first; a corpus that still cannot give both sides text (one short document) is a
// DataError naming it, raised before anything is written. Throws DataError on bad input.
PrepareResult prepare_dataset(const PrepareOptions& options);

// Whether document `doc_index` of the file named `file_name` (its base name) goes to validation:
// XXH64 of "<file_name>#<doc_index>" with `seed`, scaled to [0, 1), below val_fraction. It looks
// at nothing else, so adding or removing other files never moves a document across the split.
bool is_validation_doc(const std::string& file_name, uint64_t doc_index, uint64_t seed,
                       double val_fraction);
// The same for chunk `chunk_index` of a document that was cut: the key is
// "<file_name>#<doc_index>.<chunk_index>".
bool is_validation_chunk(const std::string& file_name, uint64_t doc_index, uint64_t chunk_index,
                         uint64_t seed, double val_fraction);

// Chunking (docs/DATA.md "The split rule"). After the document split, chunking is on when the
// documents are fewer than 1 / val_fraction (n * val_fraction < 1) or validation holds fewer than
// kMinValBytes bytes of text. Then every document longer than kChunkBytes is cut by cut_document
// (blank pieces dropped) and, if any was, the split is redone over the pieces, documents that
// were not cut keeping their key; validation is then topped up to kMinValBytes with the train
// pieces of smallest score, as long as train keeps at least as much text.
inline constexpr size_t kChunkBytes = 8192;
inline constexpr uint64_t kMinValBytes = 4096;

// Cuts `text` into k = ceil(size / chunk_bytes) pieces (one piece, the text, when k < 2). Cut j
// (1 <= j < k) lies within size/(4k) bytes of j * size / k, at the boundary nearest to that ideal
// place of the first kind found: a paragraph start (the line before it is blank), a line start,
// a position after whitespace, a UTF-8 character start; ties go to the earlier position. So
// pieces hold between about half and 1.5 times size/k bytes and never split a character. The
// pieces are consecutive and together are `text`; some may be blank.
std::vector<std::string_view> cut_document(std::string_view text, size_t chunk_bytes = kChunkBytes);

// A prepared dataset directory, opened and validated.
struct Dataset {
  TokenShard train;
  TokenShard val;
};
Dataset open_dataset(const std::filesystem::path& dir);

}  // namespace loopmoe::dataloader
