// A KeyValueStore in this process's memory: rendezvous between threads (tests, and a one-process
// run that still goes through the collective code path).
#pragma once

#include <absl/base/thread_annotations.h>
#include <absl/synchronization/mutex.h>

#include <map>

#include "comm/key_value_store.h"

namespace loopmoe::comm {

class InProcessStore final : public KeyValueStore {
 public:
  void set(const std::string& key, const std::string& value) override ABSL_LOCKS_EXCLUDED(mutex_);
  std::optional<std::string> get(const std::string& key) override ABSL_LOCKS_EXCLUDED(mutex_);
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override
      ABSL_LOCKS_EXCLUDED(mutex_);

 private:
  absl::Mutex mutex_;
  std::map<std::string, std::string> values_ ABSL_GUARDED_BY(mutex_);
};

}  // namespace loopmoe::comm
