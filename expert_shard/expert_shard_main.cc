// loopmoe-expert-shard: one expert-parallel shard of a distributed LoopMoE job (the expert FFNs
// with global ids in its range, for every unique layer). See process/process_main.h.
#include "expert_shard/shard_runtime.h"
#include "process/process_main.h"

int main(int argc, char** argv) {
  return loopmoe::process::process_main(loopmoe::runtime::Role::kExpertShard, argc, argv,
                                        loopmoe::expert_shard::create_shard_runtime);
}
