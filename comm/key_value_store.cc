#include "comm/key_value_store.h"

#include <stdexcept>
#include <utility>

#include "comm/comm_error.h"
#include "comm/store_util.h"

namespace loopmoe::comm {

std::string wait_and_get(KeyValueStore& store, const std::string& key,
                         std::chrono::milliseconds timeout) {
  store.wait({key}, timeout);
  std::optional<std::string> value = store.get(key);
  // A store only ever adds or replaces keys, so a key that wait() saw cannot vanish; if it does,
  // the store is broken, not slow.
  if (!value) throw CommError("key-value store: key '" + key + "' disappeared after wait()");
  return std::move(*value);
}

std::string rendezvous_namespace(std::string_view job_id, int64_t epoch) {
  if (job_id.empty() || job_id.find('/') != std::string_view::npos) {
    throw std::invalid_argument("rendezvous namespace: job id '" + std::string(job_id) +
                                "' must be non-empty and contain no '/'");
  }
  if (epoch < 0) {
    throw std::invalid_argument("rendezvous namespace: epoch " + std::to_string(epoch) +
                                " must be >= 0");
  }
  return "job/" + std::string(job_id) + "/epoch/" + std::to_string(epoch) + "/";
}

NamespacedStore::NamespacedStore(KeyValueStore& base, std::string prefix)
    : base_(base), prefix_(std::move(prefix)) {}

NamespacedStore::NamespacedStore(KeyValueStore& base, std::string_view job_id, int64_t epoch)
    : NamespacedStore(base, rendezvous_namespace(job_id, epoch)) {}

void NamespacedStore::set(const std::string& key, const std::string& value) {
  base_.set(prefix_ + key, value);
}

std::optional<std::string> NamespacedStore::get(const std::string& key) {
  return base_.get(prefix_ + key);
}

void NamespacedStore::wait(const std::vector<std::string>& keys,
                           std::chrono::milliseconds timeout) {
  std::vector<std::string> full;
  full.reserve(keys.size());
  for (const std::string& key : keys) full.push_back(prefix_ + key);
  base_.wait(full, timeout);
}

}  // namespace loopmoe::comm

namespace loopmoe::comm::internal {

std::string missing_keys_message(const std::string& store_name,
                                 const std::vector<std::string>& missing,
                                 std::chrono::milliseconds timeout) {
  constexpr size_t kShown = 4;
  std::string message = store_name + ": timed out after " + std::to_string(timeout.count()) +
                        " ms waiting for " + std::to_string(missing.size()) + " key(s): ";
  for (size_t i = 0; i < missing.size() && i < kShown; ++i) {
    message += (i ? ", '" : "'") + missing[i] + "'";
  }
  if (missing.size() > kShown) message += ", ...";
  return message;
}

}  // namespace loopmoe::comm::internal
