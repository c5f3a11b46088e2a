// A plaintext server with nothing but grpc.health.v1.Health, next to a TLS server, for health
// probes that cannot speak TLS (Kubernetes' `grpc:` probes). It serves no other service, so
// nothing but the health status is reachable without credentials.
#pragma once

#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>

#include <memory>
#include <string>
#include <thread>

namespace loopmoe::security {

class HealthServer {
 public:
  // Listens on `listen` (HOST:PORT; port 0 picks one). Throws std::runtime_error when it cannot.
  explicit HealthServer(const std::string& listen);
  ~HealthServer();
  HealthServer(const HealthServer&) = delete;
  HealthServer& operator=(const HealthServer&) = delete;

  // "host:port" it listens on.
  const std::string& address() const { return address_; }
  // SERVING or NOT_SERVING for the whole server ("") and every service.
  void set_serving(bool serving);
  // Stops the server. Idempotent.
  void shutdown();

 private:
  // gRPC starts no server without a method or a polled completion queue; the health service is
  // added only at Start. So the server gets a queue that nothing is ever requested on, drained
  // by `drain_` until shutdown.
  std::unique_ptr<grpc::ServerCompletionQueue> queue_;
  std::thread drain_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
};

}  // namespace loopmoe::security
