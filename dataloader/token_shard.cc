#include "dataloader/token_shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "dataloader/file_util.h"

namespace loopmoe::dataloader {
namespace {

// The format is little-endian; we copy integers byte-for-byte, which is only right on a
// little-endian host. Every machine we target is one, so refuse to build elsewhere rather than
// silently write foreign shards.
static_assert(std::endian::native == std::endian::little,
              "token shards assume a little-endian host");

template <typename T>
T load(const unsigned char* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
void store(unsigned char* p, T v) {
  std::memcpy(p, &v, sizeof v);
}

[[noreturn]] void fail(const std::filesystem::path& path, const std::string& what) {
  throw DataError(path.string() + ": " + what);
}

// Layout offsets inside the header. Version 2 is version 1's 48 bytes plus the header checksum.
constexpr size_t kOffVersion = 8, kOffVocab = 12, kOffBytesPerToken = 16, kOffReserved = 20,
                 kOffNumTokens = 24, kOffNumDocs = 32, kOffChecksum = 40, kOffHeaderChecksum = 48;
static_assert(kOffHeaderChecksum == kShardHeaderBytesV1);
static_assert(kOffHeaderChecksum + sizeof(uint64_t) == kShardHeaderBytes);

// Version 2's header checksum: XXH64 (seed 0) of the header bytes before it.
uint64_t header_checksum(const unsigned char* header) {
  return XXH64(header, kOffHeaderChecksum, 0);
}

}  // namespace

uint32_t bytes_per_token_for_vocab(uint32_t vocab_size) { return vocab_size < 65536 ? 2 : 4; }

size_t shard_header_bytes(uint32_t version) {
  return version == 1 ? kShardHeaderBytesV1 : kShardHeaderBytes;
}

void write_token_shard(const std::filesystem::path& path, uint32_t vocab_size,
                       std::span<const int32_t> tokens, std::span<const uint64_t> doc_offsets) {
  // Validate before touching the disk, so a bad call leaves no file behind.
  if (vocab_size == 0) fail(path, "vocab_size must be positive");
  if (vocab_size > static_cast<uint32_t>(std::numeric_limits<int32_t>::max())) {
    fail(path, "vocab " + std::to_string(vocab_size) + " does not fit int32 token ids");
  }
  if (doc_offsets.empty()) fail(path, "doc_offsets must hold num_docs + 1 entries (got none)");
  if (doc_offsets.front() != 0) fail(path, "doc_offsets[0] must be 0");
  if (doc_offsets.back() != tokens.size()) {
    fail(path, "doc_offsets ends at " + std::to_string(doc_offsets.back()) + " but there are " +
                   std::to_string(tokens.size()) + " tokens");
  }
  for (size_t i = 1; i < doc_offsets.size(); ++i) {
    if (doc_offsets[i] < doc_offsets[i - 1]) {
      fail(path, "doc_offsets decreases at document " + std::to_string(i - 1));
    }
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || static_cast<uint32_t>(tokens[i]) >= vocab_size) {
      fail(path, "token " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                     " is outside vocab " + std::to_string(vocab_size));
    }
  }

  const uint32_t bpt = bytes_per_token_for_vocab(vocab_size);
  const uint64_t num_docs = doc_offsets.size() - 1;

  AtomicFileWriter out(path);
  unsigned char header[kShardHeaderBytes] = {};
  out.write(header, sizeof header);  // placeholder until the checksum is known

  XXH64_state_t* state = XXH64_createState();
  if (state == nullptr) throw std::bad_alloc();
  XXH64_reset(state, 0);

  const size_t offsets_bytes = doc_offsets.size() * sizeof(uint64_t);
  XXH64_update(state, doc_offsets.data(), offsets_bytes);
  out.write(doc_offsets.data(), offsets_bytes);

  // Narrow in chunks so a huge shard never needs a second full copy in memory.
  constexpr size_t kChunk = 1 << 16;
  std::vector<unsigned char> buf(kChunk * bpt);
  for (size_t start = 0; start < tokens.size(); start += kChunk) {
    const size_t n = std::min(kChunk, tokens.size() - start);
    for (size_t i = 0; i < n; ++i) {
      const uint32_t t = static_cast<uint32_t>(tokens[start + i]);
      if (bpt == 2) {
        store<uint16_t>(&buf[i * 2], static_cast<uint16_t>(t));
      } else {
        store<uint32_t>(&buf[i * 4], t);
      }
    }
    XXH64_update(state, buf.data(), n * bpt);
    out.write(buf.data(), n * bpt);
  }
  const uint64_t checksum = XXH64_digest(state);
  XXH64_freeState(state);

  std::memcpy(header, kShardMagic, sizeof kShardMagic);
  store<uint32_t>(header + kOffVersion, kShardVersion);
  store<uint32_t>(header + kOffVocab, vocab_size);
  store<uint32_t>(header + kOffBytesPerToken, bpt);
  store<uint32_t>(header + kOffReserved, 0);
  store<uint64_t>(header + kOffNumTokens, tokens.size());
  store<uint64_t>(header + kOffNumDocs, num_docs);
  store<uint64_t>(header + kOffChecksum, checksum);
  store<uint64_t>(header + kOffHeaderChecksum, header_checksum(header));
  out.pwrite(header, sizeof header, 0);
  out.commit();
}

namespace {

// Opens `path` read-only and checks that it is a regular file; returns the descriptor and sets
// *file_bytes. Throws DataError naming the file.
int open_regular_file(const std::filesystem::path& path, uint64_t* file_bytes) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail(path, std::string("cannot stat: ") + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file");
  }
  *file_bytes = static_cast<uint64_t>(st.st_size);
  return fd;
}

// The header checks TokenShard::open and read_shard_header share. `head` holds the file's first
// `head_len` bytes: all kShardHeaderBytes, or fewer only when the file itself is shorter.
ShardHeader check_header(const std::filesystem::path& path, const unsigned char* head,
                         size_t head_len, uint64_t file_bytes) {
  // A short file that does not even start like a shard is some other file, not a cut shard;
  // saying "truncated" there would send the user looking for the wrong problem.
  const size_t magic_len = std::min(head_len, sizeof kShardMagic);
  if (magic_len == 0 || std::memcmp(head, kShardMagic, magic_len) != 0) {
    fail(path, "bad magic (not a LoopMoE token shard; expected \"LMOETOK\\0\")");
  }
  const auto truncated_header = [&](size_t header_bytes) {
    fail(path, "truncated: file holds " + std::to_string(file_bytes) + " bytes, less than the " +
                   std::to_string(header_bytes) + "-byte header");
  };
  if (file_bytes < kOffVersion + sizeof(uint32_t)) truncated_header(kShardHeaderBytesV1);
  const unsigned char* h = head;
  const uint32_t version = load<uint32_t>(h + kOffVersion);
  if (version != 1 && version != kShardVersion) {
    fail(path, "unsupported version " + std::to_string(version) +
                   " (this build reads versions 1 and " + std::to_string(kShardVersion) +
                   "; a shard from a newer LoopMoE, or a corrupt one)");
  }
  const size_t header_bytes = shard_header_bytes(version);
  if (file_bytes < header_bytes) truncated_header(header_bytes);
  // Version 2: no header field is trusted before the header checksum matches, so a flipped bit
  // is reported as corruption, not as whatever oddity the flipped field happens to show.
  if (version >= 2) {
    const uint64_t stored = load<uint64_t>(h + kOffHeaderChecksum);
    const uint64_t actual = header_checksum(h);
    if (stored != actual) {
      char buf[112];
      std::snprintf(buf, sizeof buf, "header checksum mismatch (stored %016llx, header %016llx)",
                    static_cast<unsigned long long>(stored),
                    static_cast<unsigned long long>(actual));
      fail(path, buf);
    }
  }
  ShardHeader hdr;
  hdr.version = version;
  hdr.vocab_size = load<uint32_t>(h + kOffVocab);
  hdr.bytes_per_token = load<uint32_t>(h + kOffBytesPerToken);
  hdr.num_tokens = load<uint64_t>(h + kOffNumTokens);
  hdr.num_docs = load<uint64_t>(h + kOffNumDocs);
  hdr.checksum = load<uint64_t>(h + kOffChecksum);
  if (hdr.vocab_size == 0) fail(path, "vocab size is 0");
  if (hdr.vocab_size > static_cast<uint32_t>(std::numeric_limits<int32_t>::max())) {
    fail(path, "vocab " + std::to_string(hdr.vocab_size) + " does not fit int32 token ids");
  }
  const uint32_t want_bpt = bytes_per_token_for_vocab(hdr.vocab_size);
  if (hdr.bytes_per_token != want_bpt) {
    fail(path, "vocab " + std::to_string(hdr.vocab_size) + " needs uint" +
                   std::to_string(want_bpt * 8) + " tokens, header says " +
                   std::to_string(hdr.bytes_per_token) + " bytes per token");
  }
  if (load<uint32_t>(h + kOffReserved) != 0) fail(path, "reserved header field is not 0");

  // Sizes are checked by division first: a corrupt header must not overflow the arithmetic.
  const uint64_t after_header = file_bytes - header_bytes;
  if (hdr.num_docs >= after_header / sizeof(uint64_t)) {
    fail(path, "truncated: header says " + std::to_string(hdr.num_docs) +
                   " documents, file is too short for their offset table (" +
                   std::to_string(file_bytes) + " bytes)");
  }
  const uint64_t offsets_bytes = (hdr.num_docs + 1) * sizeof(uint64_t);
  const uint64_t payload_bytes = after_header - offsets_bytes;
  const uint64_t held_tokens = payload_bytes / hdr.bytes_per_token;
  if (held_tokens < hdr.num_tokens) {
    fail(path, "truncated: header says " + std::to_string(hdr.num_tokens) + " tokens, file holds " +
                   std::to_string(held_tokens));
  }
  if (payload_bytes != hdr.num_tokens * hdr.bytes_per_token) {
    fail(path, "trailing bytes: header says " + std::to_string(hdr.num_tokens) +
                   " tokens, file holds " + std::to_string(payload_bytes) + " payload bytes");
  }
  return hdr;
}

}  // namespace

ShardHeader read_shard_header(const std::filesystem::path& path) {
  uint64_t file_bytes = 0;
  const int fd = open_regular_file(path, &file_bytes);
  unsigned char head[kShardHeaderBytes] = {};
  const size_t want = static_cast<size_t>(std::min<uint64_t>(file_bytes, kShardHeaderBytes));
  const ssize_t got = ::pread(fd, head, want, 0);
  const int err = errno;
  ::close(fd);
  if (got < 0) fail(path, std::string("cannot read: ") + std::strerror(err));
  return check_header(path, head, static_cast<size_t>(got), file_bytes);
}

TokenShard TokenShard::open(const std::filesystem::path& path) {
  TokenShard shard;
  shard.path_ = path;

  uint64_t file_bytes = 0;
  const int fd = open_regular_file(path, &file_bytes);
  if (file_bytes < kShardHeaderBytes) {
    // Too short for any valid shard (a version 1 one holds at least its header and one offset):
    // check_header says what is wrong.
    unsigned char head[kShardHeaderBytes] = {};
    const ssize_t got = ::pread(fd, head, file_bytes, 0);
    ::close(fd);
    check_header(path, head, got > 0 ? static_cast<size_t>(got) : 0, file_bytes);
    fail(path, "truncated: file holds " + std::to_string(file_bytes) + " bytes");
  }
  void* map = ::mmap(nullptr, file_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (map == MAP_FAILED) fail(path, std::string("cannot mmap: ") + std::strerror(map_err));
  shard.map_ = static_cast<const unsigned char*>(map);
  shard.map_bytes_ = file_bytes;
  // From here on `shard`'s destructor unmaps on every throw.

  const ShardHeader hdr = check_header(path, shard.map_, kShardHeaderBytes, file_bytes);
  shard.version_ = hdr.version;
  shard.vocab_size_ = hdr.vocab_size;
  shard.bytes_per_token_ = hdr.bytes_per_token;
  shard.num_tokens_ = hdr.num_tokens;
  shard.num_docs_ = hdr.num_docs;
  shard.checksum_ = hdr.checksum;
  const uint64_t offsets_bytes = (shard.num_docs_ + 1) * sizeof(uint64_t);
  const uint64_t payload_bytes = shard.num_tokens_ * shard.bytes_per_token_;
  shard.offsets_ = shard.map_ + shard_header_bytes(hdr.version);
  shard.tokens_ = shard.offsets_ + offsets_bytes;

  // Checksum before interpreting the table, so corruption is reported as such rather than as
  // whatever structural oddity the flipped bits happen to produce.
  const uint64_t actual = XXH64(shard.offsets_, offsets_bytes + payload_bytes, 0);
  if (actual != shard.checksum_) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "checksum mismatch (header %016llx, data %016llx)",
                  static_cast<unsigned long long>(shard.checksum_),
                  static_cast<unsigned long long>(actual));
    fail(path, buf);
  }

  uint64_t prev = 0;
  for (uint64_t i = 0; i <= shard.num_docs_; ++i) {
    const uint64_t off = load<uint64_t>(shard.offsets_ + i * sizeof(uint64_t));
    if ((i == 0 && off != 0) || off < prev || off > shard.num_tokens_) {
      fail(path, "bad doc offset table at entry " + std::to_string(i));
    }
    prev = off;
  }
  if (prev != shard.num_tokens_) {
    fail(path, "doc offset table ends at " + std::to_string(prev) + ", not at num_tokens " +
                   std::to_string(shard.num_tokens_));
  }

  // A checksum only proves the bytes are what the writer wrote; ids >= vocab would still index
  // past the embedding table, so check them once here instead of on every read.
  const uint32_t vocab = shard.vocab_size_;
  for (uint64_t i = 0; i < shard.num_tokens_; ++i) {
    const uint32_t t = shard.bytes_per_token_ == 2 ? load<uint16_t>(shard.tokens_ + 2 * i)
                                                   : load<uint32_t>(shard.tokens_ + 4 * i);
    if (t >= vocab) {
      fail(path, "token " + std::to_string(t) + " at index " + std::to_string(i) +
                     " is out of range for vocab " + std::to_string(vocab));
    }
  }
  return shard;
}

TokenShard::TokenShard(TokenShard&& other) noexcept { *this = std::move(other); }

TokenShard& TokenShard::operator=(TokenShard&& other) noexcept {
  if (this != &other) {
    release();
    path_ = std::move(other.path_);
    map_ = std::exchange(other.map_, nullptr);
    map_bytes_ = std::exchange(other.map_bytes_, 0);
    version_ = std::exchange(other.version_, 0);
    offsets_ = std::exchange(other.offsets_, nullptr);
    tokens_ = std::exchange(other.tokens_, nullptr);
    vocab_size_ = std::exchange(other.vocab_size_, 0);
    bytes_per_token_ = std::exchange(other.bytes_per_token_, 0);
    num_tokens_ = std::exchange(other.num_tokens_, 0);
    num_docs_ = std::exchange(other.num_docs_, 0);
    checksum_ = std::exchange(other.checksum_, 0);
  }
  return *this;
}

TokenShard::~TokenShard() { release(); }

void TokenShard::release() noexcept {
  if (map_ != nullptr) ::munmap(const_cast<unsigned char*>(map_), map_bytes_);
  map_ = nullptr;
  map_bytes_ = 0;
}

DocRange TokenShard::doc_range(uint64_t doc) const {
  if (doc >= num_docs_) {
    fail(path_, "document " + std::to_string(doc) + " out of range (shard has " +
                    std::to_string(num_docs_) + ")");
  }
  return {load<uint64_t>(offsets_ + doc * sizeof(uint64_t)),
          load<uint64_t>(offsets_ + (doc + 1) * sizeof(uint64_t))};
}

void TokenShard::read(uint64_t begin, uint64_t count, int32_t* out) const {
  if (begin > num_tokens_ || count > num_tokens_ - begin) {
    fail(path_, "read of tokens [" + std::to_string(begin) + ", " + std::to_string(begin) + "+" +
                    std::to_string(count) + ") past the end (" + std::to_string(num_tokens_) +
                    " tokens)");
  }
  if (bytes_per_token_ == 2) {
    const unsigned char* p = tokens_ + begin * 2;
    for (uint64_t i = 0; i < count; ++i) out[i] = load<uint16_t>(p + 2 * i);
  } else {
    const unsigned char* p = tokens_ + begin * 4;
    for (uint64_t i = 0; i < count; ++i) out[i] = static_cast<int32_t>(load<uint32_t>(p + 4 * i));
  }
}

}  // namespace loopmoe::dataloader
