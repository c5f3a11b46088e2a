// Test helper: one set of throwaway credentials per test binary (security::generate_credentials in
// a temporary directory, removed at exit) and the Credentials each side of the service loads from
// them, for tests that run the service secured.
#pragma once

#include <string>

#include "security/credentials.h"
#include "security/generate.h"

namespace loopmoe::security::testing {

// The files (generated on first use).
const CredentialFiles& test_credential_files();

// What the coordinator loads: certificate, key, CA, both tokens, mutual TLS.
Credentials coordinator_credentials();
// What a training process loads: certificate, key, CA, the process token, mutual TLS.
Credentials process_credentials();
// What the CLI has: the CA and the CLI token (no certificate).
Credentials cli_credentials();

}  // namespace loopmoe::security::testing
