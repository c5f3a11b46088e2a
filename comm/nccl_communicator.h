// The GPU backend: NCCL collectives on CUDA device memory. Built only when CMake finds the CUDA
// toolkit and NCCL (target loopmoe_comm_nccl). Including this header needs neither.
//
// Every data pointer passed to an NCCL communicator's alltoallv, allreduce_sum and broadcast is a
// DEVICE pointer on this rank's GPU (alltoall_counts takes and returns host vectors). Operations
// run on the communicator's own stream and return after it has finished, so results are ready and
// the timeout can be enforced by polling (a dead peer aborts the NCCL communicator).
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "comm/communicator.h"
#include "comm/key_value_store.h"

namespace loopmoe::comm {

// True if the CUDA runtime sees at least one device. Returns false (never throws, never aborts)
// on a machine without a driver or GPU.
bool cuda_device_available();

// ncclGetUniqueId's bytes (kNcclUniqueIdBytes of them). Throws CommError if NCCL refuses, e.g.
// because it finds no usable network interface.
std::string create_nccl_unique_id();

struct NcclOptions {
  // CUDA device of this rank; -1 means rank % device count (one process per GPU on a node).
  int device = -1;
  // Per-operation timeout (see communicator.h).
  std::chrono::milliseconds timeout{30000};
  // How long construction waits for the unique id and for every rank to join.
  std::chrono::milliseconds rendezvous_timeout{60000};
  // The unique id is published under nccl_unique_id_key(group) in `store`.
  std::string group = "world";
};

// Rank 0 creates the NCCL unique id and publishes it in `store` (usually a NamespacedStore for the
// job and epoch); the others wait for it; then all ranks initialise one NCCL communicator. Throws
// CommError if no CUDA device is available, TimeoutError if the group does not form in time.
std::unique_ptr<Communicator> make_nccl_communicator(KeyValueStore& store, int rank, int size,
                                                     const NcclOptions& options = {});

}  // namespace loopmoe::comm
