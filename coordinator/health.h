// A client for grpc.health.v1.Health/Check without its generated stubs (Debian ships none): the
// request and response are one-field messages, encoded here by hand.
#pragma once

#include <grpcpp/channel.h>

#include <chrono>
#include <memory>
#include <string>

namespace loopmoe::coordinator {

struct HealthResult {
  bool ok = false;     // the call succeeded
  std::string status;  // "SERVING", "NOT_SERVING", "UNKNOWN", "SERVICE_UNKNOWN"
  std::string error;   // why the call failed, when it did
  bool serving() const { return ok && status == "SERVING"; }
};

// Health/Check of `service` ("" = the whole server), waiting at most `timeout`.
HealthResult check_health(const std::shared_ptr<grpc::Channel>& channel,
                          std::chrono::milliseconds timeout, const std::string& service = "");

}  // namespace loopmoe::coordinator
