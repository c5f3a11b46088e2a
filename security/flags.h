// The security flags of the service's executables (loopmoe-coordinator, loopmoe-worker,
// loopmoe-expert-shard) and loading the credentials they name (docs/SERVICE.md "Security").
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "security/credentials.h"

namespace loopmoe::security {

// The security flags of loopmoe-coordinator, loopmoe-worker and loopmoe-expert-shard.
struct ServerFlags {
  bool insecure = false;
  std::string ca_file, cert_file, key_file, server_name;
  bool mutual_tls = false;
  std::string process_token_file;
  std::string cli_token_file;  // coordinator only
};

// Adds --insecure, --tls-ca, --tls-cert, --tls-key, --tls-server-name, --mtls and
// --process-token-file (and, with `coordinator`, --cli-token-file) to `app`, each also read from
// an environment variable (LOOPMOE_TLS_CA, ...; see docs/SERVICE.md).
void add_server_flags(CLI::App& app, ServerFlags& flags, bool coordinator);

// Loads what the flags name. Without --insecure, --tls-ca, --tls-cert, --tls-key and
// --process-token-file are required (and --cli-token-file for the coordinator); combining them
// with --insecure is an error. Prints the --insecure warning to stderr. Throws std::runtime_error
// with one clear message.
Credentials load(const ServerFlags& flags, bool coordinator, const std::string& program);

}  // namespace loopmoe::security
