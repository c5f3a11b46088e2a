// Private to the job driver's two files (job_driver.cc: the run and its step loop;
// job_driver_calls.cc: the calls to the members): how a run ends other than by finishing.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace loopmoe::coordinator::internal {

// A failure of one run of a job (a process died, timed out or answered with an error): the job
// restarts with the next epoch, unless it is out of restarts.
struct RunFailure : std::runtime_error {
  RunFailure(const std::string& what, std::vector<std::string> unreachable,
             bool policy_stop = false)
      : std::runtime_error(what), unreachable(std::move(unreachable)), policy_stop(policy_stop) {}
  std::vector<std::string> unreachable;  // process ids to declare dead
  // A member answered ABORTED: the job's own policy stopped it (train.nonfinite = "stop";
  // runtime::PolicyStop), which no restart can change.
  bool policy_stop = false;
  // ... unless the policy is "rollback" (runtime::PolicyRollback): the 0-based step that failed,
  // from the answer's details (loopmoe.v1.RunFailure). The job restarts from its last checkpoint
  // and the replay drops that step.
  std::optional<int64_t> rollback_step;
};
// A failure no restart can fix (the job's config no longer parses, a missing resume checkpoint).
struct PermanentFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// The coordinator is shutting down: leave the job as it is in the store.
struct Stopping {};
// The user cancelled the job.
struct Cancelled {};

}  // namespace loopmoe::coordinator::internal
