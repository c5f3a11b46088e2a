// Token shards: the on-disk form of a tokenized corpus (format in docs/DATA.md).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>

#include "dataloader/data_error.h"

namespace loopmoe::dataloader {

inline constexpr char kShardMagic[8] = {'L', 'M', 'O', 'E', 'T', 'O', 'K', '\0'};
// Version 2 ends the header with an XXH64 of the header bytes before it, so no header field goes
// unchecked. Version 1 (no header checksum) is still read; the writer writes version 2.
inline constexpr uint32_t kShardVersion = 2;
inline constexpr size_t kShardHeaderBytes = 56;    // version 2
inline constexpr size_t kShardHeaderBytesV1 = 48;  // version 1

// The header size of a supported version (kShardHeaderBytes or kShardHeaderBytesV1).
size_t shard_header_bytes(uint32_t version);

// 2 while every id fits a uint16 (vocab < 65536), else 4. The format fixes this, so readers can
// reject a header whose width disagrees with its vocabulary.
uint32_t bytes_per_token_for_vocab(uint32_t vocab_size);

// Writes a shard atomically: the bytes go to `path` + ".tmp", are fsynced, and the file is then
// renamed over `path`, so a crash never leaves a partial shard under the real name.
// `doc_offsets` holds num_docs + 1 token indices: doc_offsets[0] == 0, non-decreasing, last ==
// tokens.size(). Every token must lie in [0, vocab_size).
void write_token_shard(const std::filesystem::path& path, uint32_t vocab_size,
                       std::span<const int32_t> tokens, std::span<const uint64_t> doc_offsets);

// What a shard's header says, checked against the file's length.
struct ShardHeader {
  uint32_t version = 0;
  uint32_t vocab_size = 0;
  uint32_t bytes_per_token = 0;
  uint64_t num_tokens = 0;
  uint64_t num_docs = 0;
  uint64_t checksum = 0;  // XXH64 of the offset table and the tokens
};

// Reads and checks only the header of the shard at `path`: every check of TokenShard::open up to
// and including "trailing bytes" (magic, version, header checksum, vocab and width, reserved
// field, sizes against the file length), with the same messages, but neither the payload checksum
// nor the offset table nor the tokens. It reads 56 bytes at most, so it is instant for any shard
// size: the cheap way to vet a dataset before committing to a run. Throws DataError naming the
// file.
ShardHeader read_shard_header(const std::filesystem::path& path);

struct DocRange {
  uint64_t begin = 0;  // first token
  uint64_t end = 0;    // one past the last token (the document's eos)
};

// A validated, memory-mapped, read-only shard. Move-only.
class TokenShard {
 public:
  // Maps `path` and checks all of it (magic, version, header checksum, sizes against the file
  // length, payload checksum, doc-offset table, token ids < vocab) before returning; throws
  // DataError naming the file. Reads versions 1 and 2.
  static TokenShard open(const std::filesystem::path& path);

  TokenShard(TokenShard&& other) noexcept;
  TokenShard& operator=(TokenShard&& other) noexcept;
  TokenShard(const TokenShard&) = delete;
  TokenShard& operator=(const TokenShard&) = delete;
  ~TokenShard();

  const std::filesystem::path& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint32_t vocab_size() const { return vocab_size_; }
  uint32_t bytes_per_token() const { return bytes_per_token_; }
  uint64_t num_tokens() const { return num_tokens_; }
  uint64_t num_docs() const { return num_docs_; }
  uint64_t checksum() const { return checksum_; }
  DocRange doc_range(uint64_t doc) const;

  // Copies tokens [begin, begin + count) widened to int32; throws DataError if out of range.
  void read(uint64_t begin, uint64_t count, int32_t* out) const;

 private:
  TokenShard() = default;
  void release() noexcept;

  std::filesystem::path path_;
  const unsigned char* map_ = nullptr;  // whole file
  size_t map_bytes_ = 0;
  uint32_t version_ = 0;
  const unsigned char* offsets_ = nullptr;  // u64[num_docs + 1], little-endian
  const unsigned char* tokens_ = nullptr;
  uint32_t vocab_size_ = 0;
  uint32_t bytes_per_token_ = 0;
  uint64_t num_tokens_ = 0;
  uint64_t num_docs_ = 0;
  uint64_t checksum_ = 0;
};

}  // namespace loopmoe::dataloader
