// Credentials of the service's gRPC servers and clients (docs/SERVICE.md "Security"): TLS with a
// CA, a certificate for the servers (also shown as the client certificate of mutual TLS between
// the coordinator and the processes) and two bearer tokens: the CLI token for control RPCs and the
// process token for the RPCs between the coordinator and the training processes. Plaintext only
// when asked for explicitly (`--insecure`).
#pragma once

#include <grpcpp/channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>
#include <grpcpp/support/channel_arguments.h>

#include <memory>
#include <string>

namespace loopmoe::security {

// Credentials in memory (PEM text and tokens), as loaded by load() or made by a test.
struct Credentials {
  // Plaintext and no authentication at all (--insecure): every RPC is open.
  bool insecure = false;
  std::string ca_pem;    // verifies the peer's certificate (servers, and clients with mutual TLS)
  std::string cert_pem;  // this side's certificate chain: served by servers, shown by mTLS clients
  std::string key_pem;   // its private key
  // Mutual TLS: clients show cert_pem, and servers refuse process RPCs from a client without a
  // certificate verified against ca_pem.
  bool mutual_tls = false;
  // Clients: check the server's certificate for this name instead of the host of the address
  // (Kubernetes: processes are reached at pod IPs, which no certificate names).
  std::string server_name;
  std::string cli_token;      // coordinator: accepted on control RPCs; CLI: sent
  std::string process_token;  // accepted on process RPCs; sent by the coordinator and processes

  static Credentials Insecure() {
    Credentials c;
    c.insecure = true;
    return c;
  }
};

// Server credentials: plaintext when insecure; otherwise TLS with cert_pem/key_pem (both
// required) and a TokenAuthProcessor over cli_token and process_token. Throws
// std::runtime_error with one clear message when TLS material is missing.
std::shared_ptr<grpc::ServerCredentials> server_credentials(const Credentials& credentials);

// builder.AddListeningPort(listen, credentials, port), the port held alone: gRPC sets SO_REUSEPORT
// by default, with which a second server of the same user binds a port in use and the kernel
// splits the connections between the two (a coordinator started twice would take half of the
// other's calls). Without it that second server fails to start. Every server of ours listens so.
void add_exclusive_listening_port(grpc::ServerBuilder& builder, const std::string& listen,
                                  std::shared_ptr<grpc::ServerCredentials> credentials, int* port);

// A channel to `address` that sends `token` (may be empty) as a bearer token on every call: TLS
// against ca_pem (required unless insecure), the client certificate with mutual_tls, and
// server_name as the TLS target name when set. `args` are passed through.
std::shared_ptr<grpc::Channel> create_channel(const std::string& address,
                                              const Credentials& credentials,
                                              const std::string& token,
                                              grpc::ChannelArguments args = {});

// Reads a PEM or token file whole; a token is trimmed of surrounding whitespace and must hold at
// least 16 characters. Throws std::runtime_error naming the file (and the flag `what`).
std::string read_pem(const std::string& path, const std::string& what);
std::string read_token(const std::string& path, const std::string& what);

// A fresh random token: 32 bytes from the kernel's CSPRNG as 64 hex digits.
std::string random_token();

}  // namespace loopmoe::security
