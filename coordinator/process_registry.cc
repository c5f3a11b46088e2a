#include "coordinator/process_registry.h"

namespace loopmoe::coordinator {

std::string ProcessRegistry::register_process(v1::Role role, const std::string& address,
                                              const std::string& metrics_address,
                                              const std::string& name) {
  absl::MutexLock lock(&mu_);
  // Recorded first: if that throws, nothing has changed and no id was given.
  if (persist_next_id_) persist_next_id_(next_id_ + 1);
  for (auto& [order, p] : by_order_) {
    if (p.address == address) p.removed = true;
  }
  const int64_t order = next_id_++;
  ProcessInfo p;
  p.id = std::string(role == v1::EXPERT_SHARD ? "shard-" : "worker-") + std::to_string(order);
  p.role = role;
  p.address = address;
  p.metrics_address = metrics_address;
  p.name = name;
  p.last_heartbeat = Clock::now();
  order_of_[p.id] = order;
  by_order_[order] = p;
  return p.id;
}

bool ProcessRegistry::heartbeat(const std::string& id) {
  absl::MutexLock lock(&mu_);
  auto it = order_of_.find(id);
  if (it == order_of_.end()) return false;
  ProcessInfo& p = by_order_.at(it->second);
  if (p.removed) return false;
  p.last_heartbeat = Clock::now();
  return true;
}

void ProcessRegistry::remove(const std::string& id) {
  absl::MutexLock lock(&mu_);
  auto it = order_of_.find(id);
  if (it != order_of_.end()) by_order_.at(it->second).removed = true;
}

bool ProcessRegistry::is_live_locked(const ProcessInfo& p, Clock::time_point now) const {
  return !p.removed && now - p.last_heartbeat <= heartbeat_timeout_;
}

bool ProcessRegistry::is_live(const std::string& id) {
  absl::MutexLock lock(&mu_);
  auto it = order_of_.find(id);
  return it != order_of_.end() && is_live_locked(by_order_.at(it->second), Clock::now());
}

std::optional<ProcessInfo> ProcessRegistry::get(const std::string& id) {
  absl::MutexLock lock(&mu_);
  auto it = order_of_.find(id);
  if (it == order_of_.end()) return std::nullopt;
  return by_order_.at(it->second);
}

std::vector<ProcessInfo> ProcessRegistry::snapshot() {
  absl::MutexLock lock(&mu_);
  std::vector<ProcessInfo> out;
  for (auto& [order, p] : by_order_) out.push_back(p);
  return out;
}

std::vector<std::string> ProcessRegistry::idle(v1::Role role) {
  absl::MutexLock lock(&mu_);
  const auto now = Clock::now();
  std::vector<std::string> out;
  for (auto& [order, p] : by_order_) {
    if (p.role == role && p.job_id.empty() && is_live_locked(p, now)) out.push_back(p.id);
  }
  return out;
}

bool ProcessRegistry::assign(const std::vector<std::string>& ids, const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  const auto now = Clock::now();
  for (const std::string& id : ids) {
    auto it = order_of_.find(id);
    if (it == order_of_.end()) return false;
    const ProcessInfo& p = by_order_.at(it->second);
    if (!p.job_id.empty() || !is_live_locked(p, now)) return false;
  }
  for (const std::string& id : ids) by_order_.at(order_of_.at(id)).job_id = job_id;
  return true;
}

void ProcessRegistry::release(const std::vector<std::string>& ids, const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  for (const std::string& id : ids) {
    auto it = order_of_.find(id);
    if (it == order_of_.end()) continue;
    ProcessInfo& p = by_order_.at(it->second);
    if (p.job_id == job_id) p.job_id.clear();
  }
}

}  // namespace loopmoe::coordinator
