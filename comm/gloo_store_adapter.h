// Lets Gloo's rendezvous (gloo::rendezvous::Context::connectFullMesh) run over a KeyValueStore,
// and so over the coordinator. Used by the Gloo communicator; public so that tests can drive it.
#pragma once

#include <gloo/rendezvous/store.h>

#include <chrono>
#include <string>
#include <vector>

#include "comm/key_value_store.h"

namespace loopmoe::comm {

class GlooStoreAdapter final : public gloo::rendezvous::Store {
 public:
  // `timeout` bounds get() and the wait() overload without a timeout. Does not own `store`.
  GlooStoreAdapter(KeyValueStore& store, std::chrono::milliseconds timeout);

  void set(const std::string& key, const std::vector<char>& data) override;
  // Gloo's own stores block in get() until the key exists; so does this (up to the timeout).
  std::vector<char> get(const std::string& key) override;
  void wait(const std::vector<std::string>& keys) override;
  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override;

 private:
  KeyValueStore& store_;
  std::chrono::milliseconds timeout_;
};

}  // namespace loopmoe::comm
