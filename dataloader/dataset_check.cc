#include "dataloader/dataset_check.h"

namespace loopmoe::dataloader {
namespace {

ShardHeader check_shard(const std::filesystem::path& path, const DatasetNeeds& needs,
                        const std::string& why) {
  const ShardHeader h = read_shard_header(path);
  if (h.vocab_size > needs.max_vocab) {
    throw DataError(path.string() + ": shard vocabulary " + std::to_string(h.vocab_size) +
                    " exceeds model.vocab_size " + std::to_string(needs.max_vocab));
  }
  const uint64_t window = static_cast<uint64_t>(needs.seq_len) + 1;
  if (h.num_tokens < window) {
    throw DataError(path.string() + ": too few tokens for seq_len " +
                    std::to_string(needs.seq_len) + ": shard holds " +
                    std::to_string(h.num_tokens) + ", one window needs " + std::to_string(window) +
                    (why.empty() ? std::string() : "; " + why));
  }
  return h;
}

void check_needs(const std::filesystem::path& dir, const DatasetNeeds& needs) {
  if (needs.seq_len <= 0) {
    throw DataError(dir.string() + ": dataset check needs seq_len > 0 (got " +
                    std::to_string(needs.seq_len) + ")");
  }
}

}  // namespace

DatasetHeaders check_dataset(const std::filesystem::path& dir, const DatasetNeeds& needs) {
  check_needs(dir, needs);
  DatasetHeaders out;
  out.train = check_shard(dir / "train.bin", needs, "");
  if (needs.val) out.val = check_shard(dir / "val.bin", needs, needs.val_why);
  return out;
}

ShardHeader check_validation_shard(const std::filesystem::path& dir, const DatasetNeeds& needs) {
  check_needs(dir, needs);
  return check_shard(dir / "val.bin", needs, needs.val_why);
}

}  // namespace loopmoe::dataloader
