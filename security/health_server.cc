#include "security/health_server.h"

#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>

#include <chrono>
#include <stdexcept>

#include "security/credentials.h"

namespace loopmoe::security {

HealthServer::HealthServer(const std::string& listen) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int port = 0;
  add_exclusive_listening_port(builder, listen, grpc::InsecureServerCredentials(), &port);
  queue_ = builder.AddCompletionQueue(/*is_frequently_polled=*/true);
  server_ = builder.BuildAndStart();
  drain_ = std::thread([queue = queue_.get()] {
    void* tag = nullptr;
    bool ok = false;
    while (queue->Next(&tag, &ok)) {
    }
  });
  if (!server_ || port == 0 || server_->GetHealthCheckService() == nullptr) {
    shutdown();
    throw std::runtime_error("cannot listen for health checks on " + listen +
                             " (address in use or invalid?)");
  }
  address_ = listen.substr(0, listen.rfind(':')) + ":" + std::to_string(port);
  set_serving(false);
}

HealthServer::~HealthServer() { shutdown(); }

void HealthServer::set_serving(bool serving) {
  if (server_) server_->GetHealthCheckService()->SetServingStatus(serving);
}

void HealthServer::shutdown() {
  if (server_) {
    set_serving(false);
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    server_->Wait();
    server_.reset();
  }
  if (drain_.joinable()) {
    queue_->Shutdown();
    drain_.join();
  }
}

}  // namespace loopmoe::security
