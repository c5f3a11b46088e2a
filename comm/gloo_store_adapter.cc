#include "comm/gloo_store_adapter.h"

namespace loopmoe::comm {

GlooStoreAdapter::GlooStoreAdapter(KeyValueStore& store, std::chrono::milliseconds timeout)
    : store_(store), timeout_(timeout) {}

void GlooStoreAdapter::set(const std::string& key, const std::vector<char>& data) {
  store_.set(key, std::string(data.begin(), data.end()));
}

std::vector<char> GlooStoreAdapter::get(const std::string& key) {
  const std::string value = wait_and_get(store_, key, timeout_);
  return std::vector<char>(value.begin(), value.end());
}

void GlooStoreAdapter::wait(const std::vector<std::string>& keys) { store_.wait(keys, timeout_); }

void GlooStoreAdapter::wait(const std::vector<std::string>& keys,
                            const std::chrono::milliseconds& timeout) {
  store_.wait(keys, timeout);
}

}  // namespace loopmoe::comm
