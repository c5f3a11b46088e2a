// The coordinator's in-memory rendezvous key-value store (KvSet/KvGet/KvWait). Keys are namespaced
// by the clients (job/<id>/epoch/<n>/...); nothing is persisted: a coordinator restart restarts
// every job with a new epoch, hence new keys.
#pragma once

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace loopmoe::service {

class RendezvousKv {
 public:
  void set(const std::string& key, const std::string& value);
  std::optional<std::string> get(const std::string& key);
  // Blocks until every key is set, `timeout` passes or close() is called; returns the keys still
  // missing (empty: all set).
  std::vector<std::string> wait(const std::vector<std::string>& keys,
                                std::chrono::milliseconds timeout);
  // Releases every waiter (server shutdown).
  void close();
  size_t size();

 private:
  std::vector<std::string> missing_locked(const std::vector<std::string>& keys) const;

  std::mutex mu_;
  std::condition_variable changed_;
  std::map<std::string, std::string> values_;
  bool closed_ = false;
};

}  // namespace loopmoe::service
