#include "security/flags.h"

#include <cstdio>
#include <stdexcept>

#include "security/auth.h"

namespace loopmoe::security {

void add_server_flags(CLI::App& app, ServerFlags& flags, bool coordinator) {
  app.add_flag("--insecure", flags.insecure,
               "plaintext gRPC without authentication (NOT for shared networks; default: TLS and "
               "tokens)");
  app.add_option("--tls-ca", flags.ca_file,
                 "PEM CA certificate that signs the service's "
                 "certificates")
      ->envname("LOOPMOE_TLS_CA");
  app.add_option("--tls-cert", flags.cert_file, "PEM certificate of this server")
      ->envname("LOOPMOE_TLS_CERT");
  app.add_option("--tls-key", flags.key_file, "PEM private key of --tls-cert")
      ->envname("LOOPMOE_TLS_KEY");
  app.add_option("--tls-server-name", flags.server_name,
                 "name the peers' certificates are checked for (default: the host of the address)")
      ->envname("LOOPMOE_TLS_SERVER_NAME");
  app.add_flag("--mtls", flags.mutual_tls,
               "mutual TLS: show --tls-cert as client certificate, and require one signed by "
               "--tls-ca on process RPCs")
      ->envname("LOOPMOE_MTLS");
  app.add_option("--process-token-file", flags.process_token_file,
                 "file holding the process token (RPCs between the coordinator and processes)")
      ->envname("LOOPMOE_PROCESS_TOKEN_FILE");
  if (coordinator) {
    app.add_option("--cli-token-file", flags.cli_token_file,
                   "file holding the CLI token (submit, status, list, cancel, logs)")
        ->envname("LOOPMOE_CLI_TOKEN_FILE");
  }
}

Credentials load(const ServerFlags& flags, bool coordinator, const std::string& program) {
  if (flags.insecure) {
    for (const std::string* given : {&flags.ca_file, &flags.cert_file, &flags.key_file,
                                     &flags.process_token_file, &flags.cli_token_file}) {
      if (!given->empty()) {
        throw std::runtime_error("--insecure cannot be combined with TLS or token options (" +
                                 *given + ")");
      }
    }
    std::fprintf(stderr,
                 "warning: %s: --insecure: plaintext gRPC, no authentication; anyone who can "
                 "reach this port can run jobs and impersonate processes\n",
                 program.c_str());
    return Credentials::Insecure();
  }
  auto required = [](const std::string& value, const char* flag, const char* env) {
    if (value.empty()) {
      throw std::runtime_error(std::string(flag) + " (or " + env +
                               ") is required: the service uses TLS and tokens unless started "
                               "with --insecure");
    }
  };
  required(flags.ca_file, "--tls-ca", "LOOPMOE_TLS_CA");
  required(flags.cert_file, "--tls-cert", "LOOPMOE_TLS_CERT");
  required(flags.key_file, "--tls-key", "LOOPMOE_TLS_KEY");
  required(flags.process_token_file, "--process-token-file", "LOOPMOE_PROCESS_TOKEN_FILE");
  if (coordinator) required(flags.cli_token_file, "--cli-token-file", "LOOPMOE_CLI_TOKEN_FILE");
  Credentials c;
  c.ca_pem = read_pem(flags.ca_file, "--tls-ca");
  c.cert_pem = read_pem(flags.cert_file, "--tls-cert");
  c.key_pem = read_pem(flags.key_file, "--tls-key");
  c.mutual_tls = flags.mutual_tls;
  c.server_name = flags.server_name;
  c.process_token = read_token(flags.process_token_file, "--process-token-file");
  if (coordinator) {
    c.cli_token = read_token(flags.cli_token_file, "--cli-token-file");
    if (constant_time_equal(c.cli_token, c.process_token)) {
      throw std::runtime_error(
          "--cli-token-file and --process-token-file hold the same token: they must differ, or "
          "a CLI user could impersonate a process");
    }
  }
  return c;
}

}  // namespace loopmoe::security
