// The CPU backend: Gloo collectives over TCP, rendezvous through a KeyValueStore.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "comm/communicator.h"
#include "comm/key_value_store.h"

namespace loopmoe::comm {

struct GlooOptions {
  // The address this rank listens on and advertises to its peers. `interface` (e.g. "eth0"), when
  // set, wins over `hostname` (a host name or IP address).
  std::string hostname = "127.0.0.1";
  std::string interface;
  // Per-operation timeout (see communicator.h).
  std::chrono::milliseconds timeout{30000};
  // How long construction waits for every rank to publish its address and connect. Separate from
  // `timeout` because processes start at different times; a collective should not wait that long.
  std::chrono::milliseconds rendezvous_timeout{60000};
  // Rendezvous keys live under "gloo/<group>/" in `store`; distinct groups (e.g. "world",
  // "workers") can be built from one store namespace. One communicator per group per epoch.
  std::string group = "world";
};

// Connects rank `rank` of `size` to its peers: publishes its address in `store` (usually a
// NamespacedStore for the job and epoch), waits for everyone else's and connects a full mesh.
// Blocks until all `size` ranks have called it; throws TimeoutError after
// options.rendezvous_timeout. `store` is used only during this call.
std::unique_ptr<Communicator> make_gloo_communicator(KeyValueStore& store, int rank, int size,
                                                     const GlooOptions& options = {});

}  // namespace loopmoe::comm
