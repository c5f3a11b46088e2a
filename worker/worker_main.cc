// loopmoe-worker: one data-parallel worker of a distributed LoopMoE job (embedding, attention,
// IterAdaLN, router, head). See worker/process_main.h.
#include "dist/process_runtime.h"
#include "worker/process_main.h"

int main(int argc, char** argv) {
  return loopmoe::process::process_main(loopmoe::dist::Role::kWorker, argc, argv,
                                        loopmoe::dist::create_runtime);
}
