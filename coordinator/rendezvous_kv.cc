#include "coordinator/rendezvous_kv.h"

#include <absl/time/time.h>

namespace loopmoe::coordinator {

void RendezvousKv::set(const std::string& key, const std::string& value) {
  absl::MutexLock lock(&mu_);
  values_[key] = value;
}

std::optional<std::string> RendezvousKv::get(const std::string& key) {
  absl::MutexLock lock(&mu_);
  auto it = values_.find(key);
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

std::vector<std::string> RendezvousKv::missing_locked(const std::vector<std::string>& keys) const {
  std::vector<std::string> missing;
  for (const std::string& key : keys) {
    if (!values_.count(key)) missing.push_back(key);
  }
  return missing;
}

std::vector<std::string> RendezvousKv::wait(const std::vector<std::string>& keys,
                                            std::chrono::milliseconds timeout) {
  absl::MutexLock lock(&mu_);
  // Re-evaluated (by whichever thread releases mu_) at every release: a cheap check, no list.
  const auto done = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (closed_) return true;
    for (const std::string& key : keys) {
      if (!values_.count(key)) return false;
    }
    return true;
  };
  mu_.AwaitWithTimeout(absl::Condition(&done), absl::FromChrono(timeout));
  return missing_locked(keys);
}

void RendezvousKv::close() {
  absl::MutexLock lock(&mu_);
  closed_ = true;
}

size_t RendezvousKv::size() {
  absl::MutexLock lock(&mu_);
  return values_.size();
}

}  // namespace loopmoe::coordinator
