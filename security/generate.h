// Throwaway credentials for a service on one machine (`loopmoe cluster up`): a fresh CA, one
// server certificate for localhost / 127.0.0.1 / ::1 (also the client certificate of mutual TLS
// between the coordinator and the processes) and the two tokens. Made with Debian's `openssl`
// command.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace loopmoe::security {

// The files generate_credentials writes into its directory.
struct CredentialFiles {
  std::filesystem::path ca;             // ca.pem: the CA certificate (its key is deleted)
  std::filesystem::path cert;           // server.pem
  std::filesystem::path key;            // server.key (mode 0600)
  std::filesystem::path cli_token;      // cli.token (0600)
  std::filesystem::path process_token;  // process.token (0600)
};

// The paths of the files in `dir` (whether they exist or not).
CredentialFiles credential_files(const std::filesystem::path& dir);

// Creates `dir` (mode 0700) and writes new credentials into it, replacing old ones. The server
// certificate names localhost, 127.0.0.1, ::1 and `extra_names` (DNS names or IP addresses) and
// is valid for `days`. Throws std::runtime_error with one clear message (no `openssl` command,
// or what it printed when it failed).
CredentialFiles generate_credentials(const std::filesystem::path& dir,
                                     const std::vector<std::string>& extra_names = {},
                                     int days = 365);

}  // namespace loopmoe::security
