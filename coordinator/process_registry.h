// Training processes known to the coordinator: registration, heartbeats, liveness, and which job
// each one is assigned to. Thread-safe. Nothing is persisted but the id counter (through the
// caller): after a coordinator restart every process learns from its next heartbeat (known =
// false) that it must register again.
#pragma once

#include <absl/base/thread_annotations.h>
#include <absl/synchronization/mutex.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "proto/loopmoe.pb.h"

namespace loopmoe::coordinator {

struct ProcessInfo {
  std::string id;
  v1::Role role = v1::ROLE_UNSPECIFIED;
  std::string address;
  std::string metrics_address;
  std::string name;
  std::chrono::steady_clock::time_point last_heartbeat;
  std::string job_id;    // assigned job, empty when idle
  bool removed = false;  // declared dead (unreachable or replaced); heartbeats get known=false
};

class ProcessRegistry {
 public:
  using Clock = std::chrono::steady_clock;

  // Ids are numbered from `first_id`; `persist_next_id`, when set, gets the number of the next id
  // at each registration, before the new id is returned. A restarted coordinator must continue
  // the count: a process registered before the restart still heartbeats with its old id, and if
  // a new registration had been given that id, the heartbeat would be taken as the new holder's
  // (known = true), so the process would never register again and be lost to the scheduler.
  explicit ProcessRegistry(std::chrono::milliseconds heartbeat_timeout, int64_t first_id = 1,
                           std::function<void(int64_t next_id)> persist_next_id = nullptr)
      : heartbeat_timeout_(heartbeat_timeout),
        persist_next_id_(std::move(persist_next_id)),
        next_id_(first_id) {}

  std::chrono::milliseconds heartbeat_timeout() const { return heartbeat_timeout_; }

  // A new id ("worker-1", "shard-2"). A process registering at the address of an earlier one
  // replaces it (the earlier one is removed: it restarted).
  std::string register_process(v1::Role role, const std::string& address,
                               const std::string& metrics_address, const std::string& name)
      ABSL_LOCKS_EXCLUDED(mu_);
  // False when the id is unknown or removed: the process must register again.
  bool heartbeat(const std::string& id) ABSL_LOCKS_EXCLUDED(mu_);
  // Declares a process dead (unreachable): it leaves the pool until it registers again.
  void remove(const std::string& id) ABSL_LOCKS_EXCLUDED(mu_);

  bool is_live(const std::string& id) ABSL_LOCKS_EXCLUDED(mu_);
  std::optional<ProcessInfo> get(const std::string& id) ABSL_LOCKS_EXCLUDED(mu_);
  std::vector<ProcessInfo> snapshot() ABSL_LOCKS_EXCLUDED(mu_);
  // Whether `p` (one of this registry's entries or a snapshot's) is live at `now`. Reads only
  // `p` and the timeout, so it needs no lock despite its name.
  bool is_live_locked(const ProcessInfo& p, Clock::time_point now) const;

  // Idle live processes of `role`, in registration order.
  std::vector<std::string> idle(v1::Role role) ABSL_LOCKS_EXCLUDED(mu_);
  // Assigns all of `ids` to `job_id` if each is still idle and live; false (nothing assigned)
  // otherwise.
  bool assign(const std::vector<std::string>& ids, const std::string& job_id)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Makes the processes of `job_id` among `ids` idle again.
  void release(const std::vector<std::string>& ids, const std::string& job_id)
      ABSL_LOCKS_EXCLUDED(mu_);

 private:
  const std::chrono::milliseconds heartbeat_timeout_;
  const std::function<void(int64_t)> persist_next_id_;
  absl::Mutex mu_;
  int64_t next_id_ ABSL_GUARDED_BY(mu_);
  std::map<int64_t, ProcessInfo> by_order_ ABSL_GUARDED_BY(mu_);  // registration order
  std::map<std::string, int64_t> order_of_ ABSL_GUARDED_BY(mu_);
};

}  // namespace loopmoe::coordinator
