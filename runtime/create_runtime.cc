#include "runtime/create_runtime.h"

#include "expert_shard/shard_runtime.h"
#include "worker/worker_runtime.h"

namespace loopmoe::runtime {

std::unique_ptr<ProcessRuntime> create_runtime(const ProcessSetup& setup) {
  return setup.role == Role::kWorker ? worker::create_worker_runtime(setup)
                                     : expert_shard::create_shard_runtime(setup);
}

}  // namespace loopmoe::runtime
