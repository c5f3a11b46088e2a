#include "comm/nccl_unique_id.h"

#include "comm/comm_error.h"

namespace loopmoe::comm {
namespace {

void check_size(const std::string& id, const std::string& key, const char* source) {
  if (id.size() != kNcclUniqueIdBytes) {
    throw CommError("nccl unique id: " + std::string(source) + " '" + key + "' holds " +
                    std::to_string(id.size()) + " bytes, expected " +
                    std::to_string(kNcclUniqueIdBytes));
  }
}

}  // namespace

std::string nccl_unique_id_key(std::string_view group) {
  return "nccl/" + std::string(group) + "/unique_id";
}

std::string exchange_nccl_unique_id(KeyValueStore& store, int rank, std::string_view group,
                                    std::chrono::milliseconds timeout,
                                    const std::function<std::string()>& create) {
  const std::string key = nccl_unique_id_key(group);
  if (rank == 0) {
    std::string id = create();
    check_size(id, key, "id created for");
    store.set(key, id);
    return id;
  }
  std::string id = wait_and_get(store, key, timeout);
  check_size(id, key, "value of");
  return id;
}

}  // namespace loopmoe::comm
