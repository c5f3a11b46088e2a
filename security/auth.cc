#include "security/auth.h"

#include <array>
#include <utility>

namespace loopmoe::security {
namespace {

struct MethodRule {
  std::string_view method;
  Permission permission;
};

// Every method of proto/loopmoe.proto and of grpc.health.v1. A method missing here is refused, so
// a new RPC is closed until it is given a permission (tests/security checks that every method of
// the services is listed).
constexpr std::array kRules = {
    MethodRule{"/grpc.health.v1.Health/Check", Permission::kOpen},
    MethodRule{"/grpc.health.v1.Health/Watch", Permission::kOpen},
    MethodRule{"/loopmoe.v1.Coordinator/SubmitJob", Permission::kControl},
    MethodRule{"/loopmoe.v1.Coordinator/GetJob", Permission::kControl},
    MethodRule{"/loopmoe.v1.Coordinator/ListJobs", Permission::kControl},
    MethodRule{"/loopmoe.v1.Coordinator/CancelJob", Permission::kControl},
    MethodRule{"/loopmoe.v1.Coordinator/WatchJob", Permission::kControl},
    MethodRule{"/loopmoe.v1.Coordinator/ListCheckpoints", Permission::kControl},
    MethodRule{"/loopmoe.v1.Coordinator/Register", Permission::kProcess},
    MethodRule{"/loopmoe.v1.Coordinator/Heartbeat", Permission::kProcess},
    MethodRule{"/loopmoe.v1.Coordinator/KvSet", Permission::kProcess},
    MethodRule{"/loopmoe.v1.Coordinator/KvGet", Permission::kProcess},
    MethodRule{"/loopmoe.v1.Coordinator/KvWait", Permission::kProcess},
    MethodRule{"/loopmoe.v1.TrainingProcess/Configure", Permission::kProcess},
    MethodRule{"/loopmoe.v1.TrainingProcess/RunSteps", Permission::kProcess},
    MethodRule{"/loopmoe.v1.TrainingProcess/Evaluate", Permission::kProcess},
    MethodRule{"/loopmoe.v1.TrainingProcess/Checkpoint", Permission::kProcess},
    MethodRule{"/loopmoe.v1.TrainingProcess/Shutdown", Permission::kProcess},
};

}  // namespace

const char* permission_name(Permission permission) {
  switch (permission) {
    case Permission::kOpen:
      return "open";
    case Permission::kControl:
      return "control";
    case Permission::kProcess:
      return "process";
  }
  return "?";
}

std::optional<Permission> method_permission(std::string_view method) {
  for (const MethodRule& rule : kRules) {
    if (rule.method == method) return rule.permission;
  }
  return std::nullopt;
}

bool constant_time_equal(std::string_view a, std::string_view b) {
  // The length is not secret (every token of a deployment has the same length); the contents are.
  if (a.size() != b.size()) return false;
  volatile unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = diff | (static_cast<unsigned char>(a[i]) ^ static_cast<unsigned char>(b[i]));
  }
  return diff == 0;
}

TokenAuthProcessor::TokenAuthProcessor(std::string cli_token, std::string process_token,
                                       bool require_client_cert)
    : cli_token_(std::move(cli_token)),
      process_token_(std::move(process_token)),
      require_client_cert_(require_client_cert) {}

grpc::Status TokenAuthProcessor::check(std::string_view method,
                                       std::optional<std::string_view> authorization,
                                       bool peer_certified) const {
  const std::optional<Permission> needed = method_permission(method);
  if (!needed) {
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        "unknown method " + std::string(method));
  }
  if (*needed == Permission::kOpen) return grpc::Status::OK;
  const std::string_view prefix = kBearerPrefix;
  if (!authorization || !authorization->starts_with(prefix)) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "no bearer token (" + std::string(method) + " needs the " +
                            permission_name(*needed) + " token)");
  }
  const std::string_view token = authorization->substr(prefix.size());
  const bool is_cli = !cli_token_.empty() && constant_time_equal(token, cli_token_);
  const bool is_process = !process_token_.empty() && constant_time_equal(token, process_token_);
  if (!is_cli && !is_process) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "invalid bearer token");
  }
  if (*needed == Permission::kControl && !is_cli) {
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        std::string(method) + " needs the CLI (control) token");
  }
  if (*needed == Permission::kProcess) {
    if (!is_process) {
      return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                          std::string(method) + " is for training processes only");
    }
    if (require_client_cert_ && !peer_certified) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          std::string(method) + " needs a client certificate (mutual TLS)");
    }
  }
  return grpc::Status::OK;
}

grpc::Status TokenAuthProcessor::Process(const InputMetadata& auth_metadata,
                                         grpc::AuthContext* context,
                                         OutputMetadata* consumed_auth_metadata, OutputMetadata*) {
  auto find = [&](const char* key) -> std::optional<std::string_view> {
    auto it = auth_metadata.find(key);
    if (it == auth_metadata.end()) return std::nullopt;
    return std::string_view(it->second.data(), it->second.size());
  };
  const std::optional<std::string_view> path = find(":path");
  const std::optional<std::string_view> authorization = find(kAuthorizationKey);
  grpc::Status status =
      check(path.value_or(""), authorization, context != nullptr && context->IsPeerAuthenticated());
  if (status.ok() && authorization) {
    // The token stops here: handlers never see it.
    consumed_auth_metadata->emplace(kAuthorizationKey, std::string(*authorization));
  }
  return status;
}

}  // namespace loopmoe::security
