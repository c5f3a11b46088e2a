#include "coordinator/rendezvous_kv.h"

namespace loopmoe::service {

void RendezvousKv::set(const std::string& key, const std::string& value) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    values_[key] = value;
  }
  changed_.notify_all();
}

std::optional<std::string> RendezvousKv::get(const std::string& key) {
  std::lock_guard<std::mutex> lock(mu_);
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
  std::unique_lock<std::mutex> lock(mu_);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::vector<std::string> missing = missing_locked(keys);
  while (!missing.empty() && !closed_) {
    if (changed_.wait_until(lock, deadline) == std::cv_status::timeout) {
      return missing_locked(keys);
    }
    missing = missing_locked(keys);
  }
  return missing;
}

void RendezvousKv::close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
  }
  changed_.notify_all();
}

size_t RendezvousKv::size() {
  std::lock_guard<std::mutex> lock(mu_);
  return values_.size();
}

}  // namespace loopmoe::service
