// The coordinator's FIFO scheduler decision: which queued job starts next, on which registered
// processes. Strict FIFO (job id order): a job waits until the head of the queue has started, so
// a large job is never starved by smaller ones behind it. The scheduler thread that acts on the
// decision (marks the job STARTING and starts its JobDriver) is Coordinator::Impl's, in
// scheduler.cc.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "coordinator/job_store.h"
#include "coordinator/process_registry.h"
#include "proto/loopmoe.pb.h"

namespace loopmoe::coordinator {

// The head of the queue with the processes now assigned to it in the registry.
struct Assignment {
  v1::JobStatus job;                 // as read from the store, still QUEUED
  std::vector<std::string> workers;  // process ids, by rank
  std::vector<std::string> shards;   // process ids, by rank
};

// Drops from `queue` (job numbers) the jobs that are gone or no longer QUEUED, then assigns idle
// live processes (registration order) to the head job. Returns nothing when the head must wait:
// its previous run's driver has not finished (`still_running`), too few idle processes, or one
// died in between (retried on the next tick). The caller pops the head once it has started it.
std::optional<Assignment> assign_next(std::set<int64_t>& queue, JobStore& store,
                                      ProcessRegistry& registry,
                                      const std::function<bool(const std::string&)>& still_running);

}  // namespace loopmoe::coordinator
