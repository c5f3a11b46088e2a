// The coordinator's in-memory rendezvous key-value store (KvSet/KvGet/KvWait). Keys are namespaced
// by the clients (job/<id>/epoch/<n>/...); nothing is persisted: a coordinator restart restarts
// every job with a new epoch, hence new keys.
#pragma once

#include <absl/base/thread_annotations.h>
#include <absl/synchronization/mutex.h>

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace loopmoe::coordinator {

class RendezvousKv {
 public:
  void set(const std::string& key, const std::string& value) ABSL_LOCKS_EXCLUDED(mu_);
  std::optional<std::string> get(const std::string& key) ABSL_LOCKS_EXCLUDED(mu_);
  // Blocks until every key is set, `timeout` passes or close() is called; returns the keys still
  // missing (empty: all set).
  std::vector<std::string> wait(const std::vector<std::string>& keys,
                                std::chrono::milliseconds timeout) ABSL_LOCKS_EXCLUDED(mu_);
  // Releases every waiter (server shutdown).
  void close() ABSL_LOCKS_EXCLUDED(mu_);
  size_t size() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  std::vector<std::string> missing_locked(const std::vector<std::string>& keys) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Waiters sleep in mu_.Await: every change is made under mu_, which re-checks their keys.
  absl::Mutex mu_;
  std::map<std::string, std::string> values_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace loopmoe::coordinator
