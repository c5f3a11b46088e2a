// The expert shard's ProcessRuntime: the experts with global ids in its range for every unique
// layer (expert_shard/shard_experts.h), their AdamW state and checkpoint files, which may be
// resumed from a checkpoint written by a different number of shards.
#pragma once

#include <memory>

#include "runtime/process_runtime.h"

namespace loopmoe::expert_shard {

// runtime::create_runtime for setup.role == kExpertShard (see there).
std::unique_ptr<runtime::ProcessRuntime> create_shard_runtime(const runtime::ProcessSetup& setup);

}  // namespace loopmoe::expert_shard
