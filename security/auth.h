// The server side of the service's authentication (docs/SERVICE.md "Security"): which permission
// each RPC needs, and the gRPC AuthMetadataProcessor that checks the bearer token (and, with mutual
// TLS, the client certificate) of every call before its handler runs.
#pragma once

#include <grpcpp/security/auth_metadata_processor.h>

#include <optional>
#include <string>
#include <string_view>

namespace loopmoe::security {

// Who may call an RPC. kOpen: anyone (grpc.health.v1.Health); kControl: the CLI token (jobs,
// logs, checkpoints); kProcess: the process token (registration, heartbeats, the rendezvous KV
// and every TrainingProcess method), which only the coordinator and the training processes hold.
enum class Permission { kOpen, kControl, kProcess };

const char* permission_name(Permission permission);  // "open", "control", "process"

// The permission of a full method name "/package.Service/Method"; nullopt for a method this
// service does not serve (refused).
std::optional<Permission> method_permission(std::string_view method);

// Equality that takes the same time for every pair of strings of one length (no early exit), so
// a token cannot be guessed byte by byte from response times.
bool constant_time_equal(std::string_view a, std::string_view b);

// The metadata key and value prefix of the bearer token.
inline constexpr char kAuthorizationKey[] = "authorization";
inline constexpr char kBearerPrefix[] = "Bearer ";

// Checks each call of a TLS server: health is open; a control RPC needs `cli_token`, a process
// RPC `process_token` (and, with `require_client_cert`, a client certificate verified against the
// server's CA). A missing or unknown token answers UNAUTHENTICATED, a valid token of the other
// kind PERMISSION_DENIED; either way the handler never runs. An empty token accepts nothing.
class TokenAuthProcessor final : public grpc::AuthMetadataProcessor {
 public:
  TokenAuthProcessor(std::string cli_token, std::string process_token, bool require_client_cert);

  bool IsBlocking() const override { return false; }
  grpc::Status Process(const InputMetadata& auth_metadata, grpc::AuthContext* context,
                       OutputMetadata* consumed_auth_metadata,
                       OutputMetadata* response_metadata) override;

  // The decision, without gRPC (for tests): `method` as in method_permission, `authorization` the
  // metadata value (nullopt: absent), `peer_certified` whether a verified client cert was shown.
  grpc::Status check(std::string_view method, std::optional<std::string_view> authorization,
                     bool peer_certified) const;

 private:
  const std::string cli_token_;
  const std::string process_token_;
  const bool require_client_cert_;
};

}  // namespace loopmoe::security
