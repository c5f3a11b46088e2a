#include "comm/in_process_store.h"

#include <absl/time/time.h>

#include "comm/comm_error.h"
#include "comm/store_util.h"

namespace loopmoe::comm {

void InProcessStore::set(const std::string& key, const std::string& value) {
  absl::MutexLock lock(&mutex_);  // waiters re-check their keys when it is released
  values_[key] = value;
}

std::optional<std::string> InProcessStore::get(const std::string& key) {
  absl::MutexLock lock(&mutex_);
  auto it = values_.find(key);
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

void InProcessStore::wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  absl::MutexLock lock(&mutex_);
  const auto all_set = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    for (const std::string& key : keys) {
      if (!values_.contains(key)) return false;
    }
    return true;
  };
  if (mutex_.AwaitWithTimeout(absl::Condition(&all_set), absl::FromChrono(timeout))) return;
  std::vector<std::string> missing;
  for (const std::string& key : keys) {
    if (!values_.contains(key)) missing.push_back(key);
  }
  throw TimeoutError(internal::missing_keys_message("in-process store", missing, timeout));
}

}  // namespace loopmoe::comm
