// loopmoe-worker: one data-parallel worker of a distributed LoopMoE job (embedding, attention,
// IterAdaLN, router, head). See process/process_main.h.
#include "process/process_main.h"
#include "worker/worker_runtime.h"

int main(int argc, char** argv) {
  return loopmoe::process::process_main(loopmoe::runtime::Role::kWorker, argc, argv,
                                        loopmoe::worker::create_worker_runtime);
}
