// The worker's ProcessRuntime: a data-parallel replica of everything but the experts (embedding,
// attention, IterAdaLN, router, head), whose MoE layers reach the expert shards through the
// collective dispatcher (runtime/collective_dispatcher.h).
#pragma once

#include <memory>

#include "runtime/process_runtime.h"

namespace loopmoe::worker {

// runtime::create_runtime for setup.role == kWorker (see there).
std::unique_ptr<runtime::ProcessRuntime> create_worker_runtime(const runtime::ProcessSetup& setup);

}  // namespace loopmoe::worker
