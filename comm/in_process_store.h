// A KeyValueStore in this process's memory: rendezvous between threads (tests, and a one-process
// run that still goes through the collective code path).
#pragma once

#include <condition_variable>
#include <map>
#include <mutex>

#include "comm/key_value_store.h"

namespace loopmoe::comm {

class InProcessStore final : public KeyValueStore {
 public:
  void set(const std::string& key, const std::string& value) override;
  std::optional<std::string> get(const std::string& key) override;
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override;

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::map<std::string, std::string> values_;
};

}  // namespace loopmoe::comm
