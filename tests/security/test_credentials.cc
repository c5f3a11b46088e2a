#include "tests/security/test_credentials.h"

#include <cstdlib>
#include <filesystem>

#include "security/flags.h"

namespace loopmoe::security::testing {
namespace {

namespace fs = std::filesystem;

struct Generated {
  Generated() {
    std::string pattern = (fs::temp_directory_path() / "loopmoe-creds-XXXXXX").string();
    dir = mkdtemp(pattern.data());
    files = generate_credentials(dir);
  }
  ~Generated() {
    std::error_code ignored;
    fs::remove_all(dir, ignored);
  }
  fs::path dir;
  CredentialFiles files;
};

ServerFlags flags() {
  const CredentialFiles& f = test_credential_files();
  ServerFlags flags;
  flags.ca_file = f.ca.string();
  flags.cert_file = f.cert.string();
  flags.key_file = f.key.string();
  flags.mutual_tls = true;
  flags.process_token_file = f.process_token.string();
  flags.cli_token_file = f.cli_token.string();
  return flags;
}

}  // namespace

const CredentialFiles& test_credential_files() {
  static const Generated generated;
  return generated.files;
}

Credentials coordinator_credentials() { return load(flags(), /*coordinator=*/true, "test"); }

Credentials process_credentials() {
  ServerFlags f = flags();
  f.cli_token_file.clear();
  return load(f, /*coordinator=*/false, "test");
}

Credentials cli_credentials() {
  const CredentialFiles& f = test_credential_files();
  Credentials c;
  c.ca_pem = read_pem(f.ca.string(), "CA");
  c.cli_token = read_token(f.cli_token.string(), "CLI token");
  return c;
}

}  // namespace loopmoe::security::testing
