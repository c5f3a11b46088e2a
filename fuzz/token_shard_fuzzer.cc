// Token shard files (dataloader/token_shard.cc: read_shard_header, TokenShard::open and its
// accessors; dataloader/dataset_check.cc: check_dataset, what `loopmoe train` and the
// coordinator's SubmitJob run on a dataset directory). The input is written as a shard file and
// read; a file is refused with a DataError or accepted, and an accepted shard must keep what the
// header promised (documents within the tokens, every token below the vocabulary). A second pass
// repairs the header and payload checksums of an input that starts like a shard, so that the
// fuzzer gets past them to the offset table and token checks.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "dataloader/data_error.h"
#include "dataloader/dataset_check.h"
#include "dataloader/token_shard.h"
#include "fuzz/fuzz_util.h"

namespace loopmoe::fuzz {
namespace {

namespace dl = loopmoe::dataloader;

// Offsets of the format (docs/DATA.md "Token shards").
constexpr size_t kVersionAt = 8, kChecksumAt = 40, kHeaderChecksumAt = 48;

void check_shard(const dl::TokenShard& shard, const std::optional<dl::ShardHeader>& header) {
  check(header.has_value(), "TokenShard::open accepted a file read_shard_header refuses");
  check(header->version == shard.version() && header->vocab_size == shard.vocab_size() &&
            header->num_tokens == shard.num_tokens() && header->num_docs == shard.num_docs() &&
            header->checksum == shard.checksum(),
        "read_shard_header and TokenShard::open disagree");
  std::vector<int32_t> tokens;
  const uint64_t docs = std::min<uint64_t>(shard.num_docs(), 64);
  for (uint64_t d = 0; d < docs; ++d) {
    const dl::DocRange r = shard.doc_range(d);
    check(r.begin <= r.end && r.end <= shard.num_tokens(), "a document outside the tokens");
    const uint64_t n = std::min<uint64_t>(r.end - r.begin, 4096);
    tokens.resize(n);
    shard.read(r.begin, n, tokens.data());
    for (int32_t t : tokens) {
      check(t >= 0 && static_cast<uint32_t>(t) < shard.vocab_size(), "a token outside the vocab");
    }
  }
  bool threw = false;
  try {
    (void)shard.doc_range(shard.num_docs());
  } catch (const dl::DataError&) {
    threw = true;
  }
  check(threw, "doc_range past the last document did not throw");
  threw = false;
  try {
    int32_t t = 0;
    shard.read(shard.num_tokens(), 1, &t);
  } catch (const dl::DataError&) {
    threw = true;
  }
  check(threw, "a read past the last token did not throw");
}

void fuzz_file(std::string_view bytes) {
  const std::filesystem::path dir = scratch_dir() / "data";
  std::filesystem::create_directories(dir);
  const std::filesystem::path path = write_scratch("data/train.bin", bytes);
  std::optional<dl::ShardHeader> header;
  try {
    header = dl::read_shard_header(path);
  } catch (const dl::DataError&) {
  }
  try {
    const dl::TokenShard shard = dl::TokenShard::open(path);
    check_shard(shard, header);
  } catch (const dl::DataError&) {
  }
  // The dataset check of a run (train.bin and val.bin, here the same bytes).
  std::filesystem::copy_file(path, dir / "val.bin",
                             std::filesystem::copy_options::overwrite_existing);
  dl::DatasetNeeds needs;
  needs.max_vocab = 4096;
  needs.seq_len = 8;
  needs.val = true;
  needs.val_why = "fuzz";
  try {
    const dl::DatasetHeaders headers = dl::check_dataset(dir, needs);
    check(header.has_value() && headers.train.vocab_size <= needs.max_vocab &&
              headers.train.num_tokens >= static_cast<uint64_t>(needs.seq_len) + 1,
          "check_dataset accepted a shard that does not meet the needs");
  } catch (const dl::DataError&) {
  }
}

// The input with its checksums made right for what its header says (version 1 or 2), or nullopt
// when it does not start like a shard or already has them right.
std::optional<std::string> with_checksums(std::string_view bytes) {
  if (bytes.size() < dl::kShardHeaderBytesV1 ||
      bytes.substr(0, sizeof dl::kShardMagic) != std::string_view(dl::kShardMagic, 8)) {
    return std::nullopt;
  }
  const uint32_t version = load_le<uint32_t>(bytes, kVersionAt);
  const size_t header_bytes = dl::shard_header_bytes(version);
  if (bytes.size() < header_bytes) return std::nullopt;
  std::string fixed(bytes);
  store_le<uint64_t>(fixed, kChecksumAt, xxh64(fixed, header_bytes));
  if (version == 2)
    store_le<uint64_t>(fixed, kHeaderChecksumAt, xxh64(fixed, 0, kHeaderChecksumAt));
  if (fixed == bytes) return std::nullopt;
  return fixed;
}

}  // namespace
}  // namespace loopmoe::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes = loopmoe::fuzz::as_text(data, size);
  loopmoe::fuzz::fuzz_file(bytes);
  if (auto fixed = loopmoe::fuzz::with_checksums(bytes)) loopmoe::fuzz::fuzz_file(*fixed);
  return 0;
}
