// The train/validation split of `data prepare` (split.h, and prepare.h's is_validation_doc,
// is_validation_chunk and cut_document): split keys and scores, the rule, the validation top-up,
// and cutting long documents into chunks.
#include "dataloader/split.h"

#include <xxhash.h>

#include <algorithm>
#include <charconv>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "dataloader/prepare.h"

namespace loopmoe::dataloader {
namespace {

// "<file_name>#<doc_index>" for a whole document, "<file_name>#<doc_index>.<chunk>" for a chunk.
std::string split_key(const std::string& file_name, uint64_t doc_index, int64_t chunk) {
  std::string key = file_name;
  key += '#';
  key += std::to_string(doc_index);
  if (chunk >= 0) {
    key += '.';
    key += std::to_string(chunk);
  }
  return key;
}

double split_score(const std::string& key, uint64_t seed) {
  const uint64_t h = XXH64(key.data(), key.size(), seed);
  return static_cast<double>(h >> 11) * 0x1.0p-53;  // top 53 bits: exact in a double
}

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v';
}

bool is_blank(std::string_view s) { return std::all_of(s.begin(), s.end(), is_space); }

// Boundary kinds of cut_document, best first. `p` is in (0, text.size()).
bool paragraph_start(std::string_view text, size_t p) {
  if (text[p - 1] != '\n') return false;
  for (size_t i = p - 1; i-- > 0;) {  // the line before: blank up to its own start
    if (text[i] == '\n') return true;
    if (!is_space(text[i])) return false;
  }
  return true;
}
bool line_start(std::string_view text, size_t p) { return text[p - 1] == '\n'; }
bool after_space(std::string_view text, size_t p) { return is_space(text[p - 1]); }
bool char_start(std::string_view text, size_t p) {
  return (static_cast<unsigned char>(text[p]) & 0xC0) != 0x80;
}

}  // namespace

namespace split_internal {

size_t split_units(std::vector<Doc>& docs, const std::vector<Source>& sources, uint64_t seed,
                   double val_fraction) {
  size_t num_val = 0;
  for (Doc& d : docs) {
    d.score = split_score(split_key(sources[d.source].name, d.index, d.chunk), seed);
    d.val = d.score < val_fraction;
    num_val += d.val;
  }
  return apply_fallbacks(docs, num_val);
}

size_t apply_fallbacks(std::vector<Doc>& docs, size_t num_val) {
  const auto by_score = [](const Doc& a, const Doc& b) { return a.score < b.score; };
  if (docs.size() >= 2 && num_val == 0) {
    std::min_element(docs.begin(), docs.end(), by_score)->val = true;
    num_val = 1;
  } else if (docs.size() >= 2 && num_val == docs.size()) {
    std::max_element(docs.begin(), docs.end(), by_score)->val = false;
    --num_val;
  }
  return num_val;
}

uint64_t val_bytes(const std::vector<Doc>& docs) {
  uint64_t bytes = 0;
  for (const Doc& d : docs) bytes += d.val ? d.text.size() : 0;
  return bytes;
}

size_t top_up_validation(std::vector<Doc>& docs) {
  std::vector<Doc*> train;
  uint64_t train_bytes = 0;
  for (Doc& d : docs) {
    if (d.val) continue;
    train.push_back(&d);
    train_bytes += d.text.size();
  }
  std::sort(train.begin(), train.end(), [](const Doc* a, const Doc* b) {
    return a->score < b->score || (a->score == b->score && a < b);
  });
  uint64_t val = val_bytes(docs);
  size_t moved = 0;
  for (Doc* d : train) {
    if (val >= kMinValBytes || train_bytes - d->text.size() < val + d->text.size()) break;
    d->val = true;
    val += d->text.size();
    train_bytes -= d->text.size();
    ++moved;
  }
  return moved;
}

// Splits one domain's documents in place (docs/DATA.md "The split rule"): the rule with its
// fallbacks; when the documents are too few for the fraction, or validation would get too little
// text, long documents are cut into chunks and the split is redone over the pieces, documents
// that were not cut keeping their key. Returns the validation count. `label` prefixes the log.
size_t split_domain(std::vector<Doc>& docs, const std::vector<Source>& sources, uint64_t seed,
                    double val_fraction, const std::string& label, PrepareResult& result,
                    const std::function<void(const std::string&)>& say) {
  size_t num_val = split_units(docs, sources, seed, val_fraction);
  char fraction_buf[32];
  const std::string fraction(fraction_buf,
                             std::to_chars(fraction_buf, fraction_buf + 32, val_fraction).ptr);
  const uint64_t doc_val_bytes = val_bytes(docs);
  const bool too_few = static_cast<double>(docs.size()) * val_fraction < 1.0;
  if (!too_few && doc_val_bytes >= kMinValBytes) return num_val;
  std::vector<Doc> units;
  uint64_t cut = 0, chunks = 0, val_chunks = 0;
  for (const Doc& d : docs) {
    if (d.text.size() <= kChunkBytes) {
      units.push_back(d);
      continue;
    }
    const std::vector<std::string_view> pieces = cut_document(d.text);
    ++cut;
    for (size_t c = 0; c < pieces.size(); ++c) {
      if (is_blank(pieces[c])) continue;  // whitespace only: nothing to learn from
      units.push_back({d.source, d.index, static_cast<int64_t>(c), pieces[c], 0.0, false});
      ++chunks;
    }
  }
  if (cut == 0) return num_val;
  docs = std::move(units);
  num_val = split_units(docs, sources, seed, val_fraction);
  num_val += top_up_validation(docs);
  for (const Doc& d : docs) val_chunks += d.val && d.chunk >= 0;
  result.chunked_docs += cut;
  result.chunks += chunks;
  result.val_chunks += val_chunks;
  say(label +
      (too_few ? "documents too few for val fraction " + fraction
               : "validation would hold only " + std::to_string(doc_val_bytes) + " bytes") +
      ": cut " + std::to_string(cut) + " document(s) longer than " + std::to_string(kChunkBytes) +
      " bytes into " + std::to_string(chunks) + " chunks at paragraph/line boundaries; " +
      std::to_string(val_chunks) + " chunks go to validation");
  return num_val;
}

}  // namespace split_internal

bool is_validation_doc(const std::string& file_name, uint64_t doc_index, uint64_t seed,
                       double val_fraction) {
  return split_score(split_key(file_name, doc_index, -1), seed) < val_fraction;
}

bool is_validation_chunk(const std::string& file_name, uint64_t doc_index, uint64_t chunk_index,
                         uint64_t seed, double val_fraction) {
  return split_score(split_key(file_name, doc_index, static_cast<int64_t>(chunk_index)), seed) <
         val_fraction;
}

std::vector<std::string_view> cut_document(std::string_view text, size_t chunk_bytes) {
  const size_t n = text.size();
  const size_t k = chunk_bytes == 0 ? 1 : (n + chunk_bytes - 1) / chunk_bytes;
  if (k < 2) return {text};
  const size_t slack = n / k / 4;
  std::vector<size_t> cuts = {0};
  for (size_t j = 1; j < k; ++j) {
    const size_t ideal = j * (n / k) + j * (n % k) / k;  // j * n / k without overflow
    size_t cut = ideal;
    bool found = false;
    for (auto* kind : {paragraph_start, line_start, after_space, char_start}) {
      // Nearest first, the earlier side first on a tie; never at 0 or n, never before the last
      // cut (the windows of neighbouring cuts do not overlap, but stay safe).
      for (size_t d = 0; d <= slack && !found; ++d) {
        for (const size_t p : {ideal - std::min(d, ideal), ideal + d}) {
          if (p <= cuts.back() || p >= n || !kind(text, p)) continue;
          cut = p;
          found = true;
          break;
        }
      }
      if (found) break;
    }
    if (!found) continue;  // only when the window holds no character start at all: no cut here
    cuts.push_back(cut);
  }
  cuts.push_back(n);
  std::vector<std::string_view> pieces;
  for (size_t i = 0; i + 1 < cuts.size(); ++i) {
    pieces.push_back(text.substr(cuts[i], cuts[i + 1] - cuts[i]));
  }
  return pieces;
}

}  // namespace loopmoe::dataloader
