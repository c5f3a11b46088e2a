// Either role's runtime behind one factory, for what hosts both kinds of process in one program
// (the cluster tests and benchmark run W workers + S shards as threads). The role executables
// link only their own: worker::create_worker_runtime, expert_shard::create_shard_runtime.
#pragma once

#include <memory>

#include "runtime/process_runtime.h"

namespace loopmoe::runtime {

// Rendezvous with the job's other processes (blocks until all have arrived or the rendezvous
// timeout passes), build this process's part of the model (initialised from the config's seed,
// identically to the single-process trainer), and load `setup.resume` when set. Throws ConfigError
// for a bad config, DataError for unreadable data or checkpoint files, comm errors for rendezvous.
std::unique_ptr<ProcessRuntime> create_runtime(const ProcessSetup& setup);

}  // namespace loopmoe::runtime
