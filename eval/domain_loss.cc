#include "eval/domain_loss.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "dataloader/data_error.h"
#include "dataloader/sampler.h"
#include "dataloader/token_shard.h"
#include "model/model.h"

namespace loopmoe::eval {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

// A non-negative integer field of a domain entry.
uint64_t uint_field(const Json& d, const char* key, const std::string& where) {
  const auto it = d.find(key);
  if (it == d.end() || !it->is_number_unsigned()) {
    throw dataloader::DataError(where + ": \"" + key +
                                "\" is missing or not a non-negative integer");
  }
  return it->get<uint64_t>();
}

}  // namespace

std::vector<ValDomain> read_val_domains(const fs::path& meta_file, uint64_t val_tokens) {
  std::error_code ec;
  if (!fs::exists(meta_file, ec)) return {};
  std::ifstream in(meta_file, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  if (!in) throw dataloader::DataError(meta_file.string() + ": cannot be read");
  const std::string file = meta_file.string();
  const Json meta = Json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (meta.is_discarded()) throw dataloader::DataError(file + ": not valid JSON");
  if (!meta.is_object()) throw dataloader::DataError(file + ": not a JSON object");
  const auto it = meta.find("domains");
  if (it == meta.end()) return {};
  if (!it->is_array()) throw dataloader::DataError(file + ": \"domains\" is not an array");
  std::vector<ValDomain> domains;
  for (size_t i = 0; i < it->size(); ++i) {
    const Json& d = (*it)[i];
    const std::string where = file + ": domains[" + std::to_string(i) + "]";
    if (!d.is_object()) throw dataloader::DataError(where + ": not an object");
    const auto name = d.find("name");
    if (name == d.end() || !name->is_string()) {
      throw dataloader::DataError(where + ": \"name\" is missing or not a string");
    }
    ValDomain v;
    v.name = name->get<std::string>();
    v.begin = uint_field(d, "val_token_begin", where);
    v.end = uint_field(d, "val_token_end", where);
    if (v.begin > v.end || v.end > val_tokens) {
      throw dataloader::DataError(where + " (" + v.name + "): val tokens [" +
                                  std::to_string(v.begin) + ", " + std::to_string(v.end) +
                                  ") are not inside val.bin's " + std::to_string(val_tokens) +
                                  " tokens");
    }
    if (d.contains("val_tokens") && uint_field(d, "val_tokens", where) != v.end - v.begin) {
      throw dataloader::DataError(where + " (" + v.name + "): \"val_tokens\" " +
                                  d["val_tokens"].dump() + " is not val_token_end - " +
                                  "val_token_begin = " + std::to_string(v.end - v.begin));
    }
    domains.push_back(std::move(v));
  }
  return domains;
}

DomainPlan plan_domain(uint64_t windows, int batch, int batches, int n_domains) {
  if (windows == 0 || batch < 1 || batches < 1 || n_domains < 1) return {};
  if (windows < static_cast<uint64_t>(batch)) return {1, static_cast<int>(windows)};
  const uint64_t wanted = (static_cast<uint64_t>(batches) + n_domains - 1) / n_domains;
  return {static_cast<int>(std::min(wanted, windows / batch)), batch};
}

std::vector<DomainLoss> domain_losses(model::Model& model, const dataloader::TokenShard& val,
                                      const std::vector<ValDomain>& domains, int batch, int seq_len,
                                      int batches,
                                      const std::function<void(size_t, size_t)>& progress) {
  const int n = static_cast<int>(domains.size());
  std::vector<DomainLoss> out;
  std::vector<DomainPlan> plans;
  size_t total = 0, done = 0;
  for (const ValDomain& d : domains) {
    const uint64_t length = d.end - d.begin;
    const uint64_t windows = length > static_cast<uint64_t>(seq_len) ? (length - 1) / seq_len : 0;
    plans.push_back(plan_domain(windows, batch, batches, n));
    total += plans.back().forwards;
  }
  for (int i = 0; i < n; ++i) {
    const ValDomain& d = domains[i];
    const DomainPlan& p = plans[i];
    DomainLoss l;
    l.name = d.name;
    l.val_tokens = d.end - d.begin;
    if (p.forwards > 0) {
      dataloader::BatchSampler sampler(val, p.rows, seq_len, 0, dataloader::WindowOrder::kSpread,
                                       d.begin, d.end);
      std::vector<int32_t> in(static_cast<size_t>(p.rows) * seq_len), tg(in.size());
      double sum = 0;
      for (int k = 0; k < p.forwards; ++k) {
        sampler.next(in.data(), tg.data());
        // Summed and divided as loss_figures does for the overall validation loss.
        sum += model.forward(in.data(), tg.data(), p.rows, seq_len).ce;
        if (progress) progress(++done, total);
      }
      l.val_loss = sum / p.forwards;
      l.windows = static_cast<int64_t>(p.forwards) * p.rows;
      l.tokens = l.windows * seq_len;
    }
    out.push_back(std::move(l));
  }
  return out;
}

}  // namespace loopmoe::eval
