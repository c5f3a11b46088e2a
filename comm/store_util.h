// Internal helpers shared by the KeyValueStore implementations (not part of comm's public API).
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace loopmoe::comm::internal {

// The TimeoutError message for keys still missing after `timeout`: names the store, the timeout
// and the first few missing keys, which is what one needs to see which peer never arrived.
std::string missing_keys_message(const std::string& store_name,
                                 const std::vector<std::string>& missing,
                                 std::chrono::milliseconds timeout);

}  // namespace loopmoe::comm::internal
