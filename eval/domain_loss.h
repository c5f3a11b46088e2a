// Held-out loss per domain (docs/EVAL.md "Per-domain perplexity"): `data prepare` lists each input
// directory's range of val.bin in meta.json's "domains"; eval scores windows inside each range.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

namespace loopmoe::model {
class Model;
}  // namespace loopmoe::model
namespace loopmoe::dataloader {
class TokenShard;
}  // namespace loopmoe::dataloader

namespace loopmoe::eval {

// A domain's validation text: tokens [begin, end) of val.bin.
struct ValDomain {
  std::string name;
  uint64_t begin = 0;
  uint64_t end = 0;
};

// The "domains" of a dataset's meta.json, in val.bin order. Empty when the file does not exist or
// has no "domains" key (datasets prepared before domains were recorded). Throws DataError naming
// the file when it is not JSON or a domain is malformed: a missing or mistyped name,
// val_token_begin or val_token_end, a range not inside val.bin's `val_tokens` tokens, or a
// val_tokens field that is not the range's length.
std::vector<ValDomain> read_val_domains(const std::filesystem::path& meta_file,
                                        uint64_t val_tokens);

struct DomainLoss {
  std::string name;
  double val_loss = 0;      // mean cross-entropy (nats/token); meaningless when windows == 0
  int64_t windows = 0;      // windows scored; 0 when the range is shorter than seq_len + 1 tokens
  int64_t tokens = 0;       // target tokens scored: windows * seq_len
  uint64_t val_tokens = 0;  // the domain's validation tokens (end - begin)
};

// How one domain is scored: `forwards` forwards of `rows` windows each.
struct DomainPlan {
  int forwards = 0;
  int rows = 0;
};
// The windows of one domain that eval scores, given the range's `windows` (windows_per_epoch):
// ceil(batches / n_domains) forwards of `batch` windows, at most as many whole batches as the range
// holds (no window twice); a range with fewer than `batch` windows (but at least one) is scored in
// one forward of all of them; none: {0, 0}.
DomainPlan plan_domain(uint64_t windows, int batch, int batches, int n_domains);

// Mean cross-entropy per domain at the model's trained loop count (no auxiliary losses), over
// kSpread windows of seq_len + 1 tokens inside each domain's range (dataloader::BatchSampler with
// seed 0), planned by plan_domain. `progress`, if set, is called after every forward.
std::vector<DomainLoss> domain_losses(model::Model& model, const dataloader::TokenShard& val,
                                      const std::vector<ValDomain>& domains, int batch, int seq_len,
                                      int batches,
                                      const std::function<void(size_t, size_t)>& progress);

}  // namespace loopmoe::eval
