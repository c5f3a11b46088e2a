#include "comm/in_process_store.h"

#include "comm/comm_error.h"
#include "comm/store_util.h"

namespace loopmoe::comm {

void InProcessStore::set(const std::string& key, const std::string& value) {
  {
    std::lock_guard lock(mutex_);
    values_[key] = value;
  }
  changed_.notify_all();
}

std::optional<std::string> InProcessStore::get(const std::string& key) {
  std::lock_guard lock(mutex_);
  auto it = values_.find(key);
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

void InProcessStore::wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::unique_lock lock(mutex_);
  auto missing = [&] {
    std::vector<std::string> result;
    for (const std::string& key : keys) {
      if (!values_.contains(key)) result.push_back(key);
    }
    return result;
  };
  if (changed_.wait_until(lock, deadline, [&] { return missing().empty(); })) return;
  throw TimeoutError(internal::missing_keys_message("in-process store", missing(), timeout));
}

}  // namespace loopmoe::comm
