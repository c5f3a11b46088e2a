// The key-value store processes rendezvous through. In the service the coordinator's RPC client
// implements it; tests use InProcessStore (threads) or FileStore (processes on one machine).
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace loopmoe::comm {

// Keys are '/'-separated strings; values are arbitrary bytes held in a std::string.
// Implementations must be safe to call from several threads at once.
class KeyValueStore {
 public:
  virtual ~KeyValueStore() = default;

  // Stores `value` under `key`, replacing any earlier value. Once set() returns, every process
  // sharing the store can see the value (readers never see a partial value).
  virtual void set(const std::string& key, const std::string& value) = 0;

  // The value under `key`, or nullopt if it has not been set. Never waits.
  virtual std::optional<std::string> get(const std::string& key) = 0;

  // Returns once every key in `keys` is set. Throws TimeoutError naming the missing keys if that
  // has not happened within `timeout`.
  virtual void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) = 0;
};

// wait({key}, timeout), then get(key).
std::string wait_and_get(KeyValueStore& store, const std::string& key,
                         std::chrono::milliseconds timeout);

// "job/<job_id>/epoch/<epoch>/": every key of one run of one job lives under it, so a restarted
// job (epoch + 1) never reads the addresses or ids its dead predecessor published. `job_id` must be
// non-empty and contain no '/'; `epoch` must be >= 0 (std::invalid_argument otherwise).
std::string rendezvous_namespace(std::string_view job_id, int64_t epoch);

// A view of `base` in which every key is prefixed. Does not own `base`.
class NamespacedStore final : public KeyValueStore {
 public:
  // Keys become `prefix` + key (give the prefix its own trailing '/').
  NamespacedStore(KeyValueStore& base, std::string prefix);
  // Keys become rendezvous_namespace(job_id, epoch) + key.
  NamespacedStore(KeyValueStore& base, std::string_view job_id, int64_t epoch);

  const std::string& prefix() const { return prefix_; }

  void set(const std::string& key, const std::string& value) override;
  std::optional<std::string> get(const std::string& key) override;
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override;

 private:
  KeyValueStore& base_;
  std::string prefix_;
};

}  // namespace loopmoe::comm
