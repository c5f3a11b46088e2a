// The rendezvous KeyValueStore of the distributed service: the Coordinator's KvSet / KvGet /
// KvWait RPCs. Processes of a job publish their Gloo addresses (and NCCL ids) through it.
#pragma once

#include <grpcpp/channel.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "comm/key_value_store.h"
#include "proto/loopmoe.grpc.pb.h"

namespace loopmoe::process {

class CoordinatorStore final : public comm::KeyValueStore {
 public:
  // `address` is the coordinator's host:port, used in error messages. Each set/get RPC gets
  // `rpc_timeout`; an unreachable coordinator fails within it (no wait-for-ready), since a
  // rendezvous that cannot reach its store should fail fast rather than eat the job's timeout.
  CoordinatorStore(std::shared_ptr<grpc::Channel> channel, std::string address,
                   std::chrono::milliseconds rpc_timeout = std::chrono::seconds(10));
  // Convenience for tests: a plaintext channel to `address` without credentials (the processes
  // pass their secured channel to the constructor above).
  explicit CoordinatorStore(const std::string& address);

  const std::string& address() const { return address_; }

  // Throw comm::CommError naming the coordinator when an RPC fails (comm::TimeoutError when its
  // deadline passed).
  void set(const std::string& key, const std::string& value) override;
  std::optional<std::string> get(const std::string& key) override;
  // Repeats KvWait calls of at most `max_wait_slice` each until every key is set or `timeout`
  // has passed, then throws comm::TimeoutError naming the keys still missing. Slicing keeps each
  // RPC short, so a long rendezvous survives proxies and server-side caps on KvWait.
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override;

  void set_max_wait_slice(std::chrono::milliseconds slice) { max_wait_slice_ = slice; }

  // While one lives, every wait() of this thread also ends, with comm::CommError, once
  // `abandoned()` returns true: it is asked after each KvWait slice, at most a second apart
  // meanwhile. The TrainingProcess server holds one around Configure's rendezvous, abandoned once
  // the coordinator has cancelled that call (it failed the run: a member died or did not
  // answer). Otherwise the survivors of a member killed during the rendezvous would wait for its
  // keys for the whole rendezvous timeout, and the job's restart could not configure them.
  class AbandonWaitsIf {
   public:
    explicit AbandonWaitsIf(std::function<bool()> abandoned);
    ~AbandonWaitsIf();
    AbandonWaitsIf(const AbandonWaitsIf&) = delete;
    AbandonWaitsIf& operator=(const AbandonWaitsIf&) = delete;

   private:
    std::function<bool()> abandoned_;
    const std::function<bool()>* previous_;
  };

 private:
  // The stub is thread-safe, so the store needs no lock of its own.
  std::unique_ptr<loopmoe::v1::Coordinator::Stub> stub_;
  std::string address_;
  std::chrono::milliseconds rpc_timeout_;
  std::chrono::milliseconds max_wait_slice_{5000};
};

}  // namespace loopmoe::process
