#include "comm/gloo_communicator.h"

#include <gloo/allreduce.h>
#include <gloo/alltoallv.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/transport/tcp/device.h>

#include <chrono>
#include <cstring>
#include <stdexcept>

#include "comm/comm_error.h"
#include "comm/gloo_store_adapter.h"
#include "comm/sigpipe_guard.h"

namespace loopmoe::comm {
namespace {

// Gloo wraps raw pointers in transport buffers and copies the local segment with memcpy; give it
// a valid address when a caller passes null for an empty buffer.
template <typename T>
T* non_null(T* ptr) {
  static T dummy{};
  return ptr ? ptr : &dummy;
}

}  // namespace

class GlooCommunicator final : public Communicator {
 public:
  GlooCommunicator(KeyValueStore& store, int rank, int size, const GlooOptions& options)
      : Communicator(rank, size, options.timeout) {
    // One rank has no peers: the collectives below are local copies and no-ops, and Gloo (which
    // would spin up a device thread and a listening socket for nothing) is not involved.
    if (size == 1) return;
    if (options.rendezvous_timeout.count() <= 0) {
      throw std::invalid_argument("comm(gloo): rendezvous_timeout must be positive");
    }
    const std::string prefix = "gloo/" + options.group + "/";
    const auto start = std::chrono::steady_clock::now();
    internal::SigpipeGuard guard;
    try {
      gloo::transport::tcp::attr attr;
      if (!options.interface.empty()) {
        attr.iface = options.interface;
      } else {
        attr.hostname = options.hostname;
      }
      auto device = gloo::transport::tcp::CreateDevice(attr);
      auto context = std::make_shared<gloo::rendezvous::Context>(rank, size);
      // Gloo uses the context timeout for the store waits and the TCP connects of the rendezvous;
      // afterwards it is only the default, and every operation sets its own.
      context->setTimeout(options.rendezvous_timeout);
      NamespacedStore group_store(store, prefix);
      GlooStoreAdapter adapter(group_store, options.rendezvous_timeout);
      context->connectFullMesh(adapter, device);
      context->setTimeout(options.timeout);
      context_ = std::move(context);
    } catch (const std::exception& e) {
      // Our store says TimeoutError; Gloo's TCP connect says "Connect timeout" in an IoException.
      // Either way, having used up the whole rendezvous timeout means someone never arrived.
      const bool timed_out = dynamic_cast<const TimeoutError*>(&e) != nullptr ||
                             std::chrono::steady_clock::now() - start >= options.rendezvous_timeout;
      if (timed_out) throw TimeoutError(rendezvous_message(options, prefix, e.what()));
      throw CommError(rendezvous_message(options, prefix, e.what()));
    }
  }

  ~GlooCommunicator() override {
    internal::SigpipeGuard guard;
    context_.reset();
  }

  const char* backend() const override { return "gloo"; }

 protected:
  void do_alltoallv(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                    const std::vector<int64_t>& recv_counts, DataType type) override {
    internal::SigpipeGuard guard;
    if (!context_) {
      const size_t bytes = static_cast<size_t>(send_counts[0]) * element_size(type);
      if (bytes > 0) std::memcpy(recv, send, bytes);
      return;
    }
    with_type(type, [&](auto tag) {
      using T = decltype(tag);
      gloo::AlltoallvOptions opts(context_);
      // Gloo never writes through the input buffer; its API just takes a mutable pointer.
      opts.setInput(non_null(const_cast<T*>(static_cast<const T*>(send))), send_counts);
      opts.setOutput(non_null(static_cast<T*>(recv)), recv_counts);
      opts.setTimeout(timeout());
      gloo::alltoallv(opts);
    });
  }

  void do_alltoall_counts(const int64_t* send, int64_t* recv) override {
    const std::vector<int64_t> ones(size(), 1);
    do_alltoallv(send, ones, recv, ones, DataType::kInt64);
  }

  void do_allreduce_sum(void* data, size_t n, DataType type) override {
    internal::SigpipeGuard guard;
    if (!context_) return;
    with_type(type, [&](auto tag) {
      using T = decltype(tag);
      gloo::AllreduceOptions opts(context_);
      opts.setOutput(static_cast<T*>(data), n);
      // gloo::sum is overloaded; pick the (out, in1, in2, n) form that AllreduceOptions wants.
      void (*reduce)(void*, const void*, const void*, size_t) = &gloo::sum<T>;
      opts.setReduceFunction(reduce);
      opts.setTimeout(timeout());
      gloo::allreduce(opts);
    });
  }

  void do_broadcast(int root, void* data, size_t n, DataType type) override {
    internal::SigpipeGuard guard;
    if (!context_) return;
    with_type(type, [&](auto tag) {
      using T = decltype(tag);
      gloo::BroadcastOptions opts(context_);
      // Output only, on every rank including the root: Gloo then broadcasts in place.
      opts.setOutput(static_cast<T*>(data), n);
      opts.setRoot(root);
      opts.setTimeout(timeout());
      gloo::broadcast(opts);
    });
  }

  void do_barrier() override {
    internal::SigpipeGuard guard;
    if (!context_) return;
    gloo::BarrierOptions opts(context_);
    opts.setTimeout(timeout());
    gloo::barrier(opts);
  }

  void abort_transport() noexcept override {
    internal::SigpipeGuard guard;
    if (!context_) return;
    // Closing our sockets makes peers blocked on us see "connection closed" now rather than
    // waiting out their own timeouts; the context cannot be reused after a failure anyway.
    try {
      context_->closeConnections();
    } catch (...) {
    }
  }

 private:
  template <typename Fn>
  static void with_type(DataType type, Fn&& fn) {
    switch (type) {
      case DataType::kFloat32:
        return fn(float{});
      case DataType::kFloat64:
        return fn(double{});
      case DataType::kInt64:
        return fn(int64_t{});
    }
  }

  std::string rendezvous_message(const GlooOptions& options, const std::string& prefix,
                                 const std::string& cause) const {
    return "comm(gloo): rendezvous of rank " + std::to_string(rank()) + " of " +
           std::to_string(size()) + " (keys '" + prefix + "*', address " +
           (options.interface.empty() ? options.hostname : "interface " + options.interface) +
           ", timeout " + std::to_string(options.rendezvous_timeout.count()) +
           " ms) failed: " + cause;
  }

  std::shared_ptr<gloo::Context> context_;  // null when size() == 1
};

std::unique_ptr<Communicator> make_gloo_communicator(KeyValueStore& store, int rank, int size,
                                                     const GlooOptions& options) {
  return std::make_unique<GlooCommunicator>(store, rank, size, options);
}

}  // namespace loopmoe::comm
