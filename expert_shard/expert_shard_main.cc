// loopmoe-expert-shard: one expert-parallel shard of a distributed LoopMoE job (the expert FFNs
// with global ids in its range, for every unique layer). See worker/process_main.h.
#include "dist/process_runtime.h"
#include "worker/process_main.h"

int main(int argc, char** argv) {
  return loopmoe::process::process_main(loopmoe::dist::Role::kExpertShard, argc, argv,
                                        loopmoe::dist::create_runtime);
}
