// Publishing an NCCL unique id through a KeyValueStore. Kept apart from nccl_communicator.h and
// free of NCCL headers: the id is 128 opaque bytes, so the exchange is testable without CUDA.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <string>
#include <string_view>

#include "comm/key_value_store.h"

namespace loopmoe::comm {

// NCCL_UNIQUE_ID_BYTES (nccl_communicator.cc checks that the two agree).
inline constexpr size_t kNcclUniqueIdBytes = 128;

// "nccl/<group>/unique_id", relative to the store it is used with (the job/epoch namespace).
std::string nccl_unique_id_key(std::string_view group);

// Rank 0 calls `create` (ncclGetUniqueId in production) and publishes the bytes; every other rank
// waits up to `timeout` for them. Returns the id on every rank. Throws TimeoutError if rank 0 never
// publishes, CommError if the value found is not kNcclUniqueIdBytes long (or `create` returns
// such).
std::string exchange_nccl_unique_id(KeyValueStore& store, int rank, std::string_view group,
                                    std::chrono::milliseconds timeout,
                                    const std::function<std::string()>& create);

}  // namespace loopmoe::comm
