#include "security/generate.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

#include "common/subprocess.h"
#include "common/text_file.h"
#include "security/credentials.h"

namespace loopmoe::security {
namespace {

namespace fs = std::filesystem;

// Runs `openssl args...` with its output in `log`; throws with that output when it fails.
void openssl(const std::vector<std::string>& args, const fs::path& log) {
  std::vector<std::string> argv = {"openssl"};
  argv.insert(argv.end(), args.begin(), args.end());
  common::SpawnOptions options;
  options.log = log;
  options.log_mode = 0600;  // it may echo key material
  options.search_path = true;
  pid_t pid = -1;
  try {
    pid = common::spawn_logged(argv, options);
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(std::string(e.what()) +
                             ": install the Debian package openssl (scripts/setup.sh)");
  }
  if (!common::exited_ok(common::wait_for(pid))) {
    const std::string out = common::read_text_if_present(log).value_or("");
    std::string trimmed = out;
    while (!trimmed.empty() && (trimmed.back() == '\n' || trimmed.back() == '\r')) {
      trimmed.pop_back();
    }
    throw std::runtime_error("openssl " + args.at(0) + " failed making credentials: " +
                             (trimmed.empty() ? "no output" : trimmed));
  }
}

void write_secret(const fs::path& path, const std::string& text) {
  fs::remove(path);
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) {
    throw std::runtime_error(path.string() + ": cannot write (" + std::strerror(errno) + ")");
  }
  const std::string line = text + "\n";
  const bool ok = write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size());
  close(fd);
  if (!ok) throw std::runtime_error(path.string() + ": write failed");
}

bool is_ip(const std::string& name) {
  unsigned char buf[16];
  return inet_pton(AF_INET, name.c_str(), buf) == 1 || inet_pton(AF_INET6, name.c_str(), buf) == 1;
}

}  // namespace

CredentialFiles credential_files(const fs::path& dir) {
  return {dir / "ca.pem", dir / "server.pem", dir / "server.key", dir / "cli.token",
          dir / "process.token"};
}

CredentialFiles generate_credentials(const fs::path& dir, const std::vector<std::string>& extra,
                                     int days) {
  fs::create_directories(dir);
  fs::permissions(dir, fs::perms::owner_all, fs::perm_options::replace);
  const CredentialFiles files = credential_files(dir);
  const fs::path ca_key = dir / "ca.key";
  const fs::path log = dir / "openssl.log";
  const std::string valid = std::to_string(days);
  const std::vector<std::string> ec = {"-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                                       "-nodes"};
  std::vector<std::string> ca_args = {"req", "-x509"};
  ca_args.insert(ca_args.end(), ec.begin(), ec.end());
  ca_args.insert(ca_args.end(),
                 {"-keyout", ca_key.string(), "-out", files.ca.string(), "-days", valid, "-subj",
                  "/CN=loopmoe throwaway CA", "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign"});
  openssl(ca_args, log);
  std::string san = "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1";
  for (const std::string& name : extra) san += (is_ip(name) ? ",IP:" : ",DNS:") + name;
  std::vector<std::string> cert_args = {"req",    "-x509",        "-CA", files.ca.string(),
                                        "-CAkey", ca_key.string()};
  cert_args.insert(cert_args.end(), ec.begin(), ec.end());
  cert_args.insert(cert_args.end(), {"-keyout", files.key.string(), "-out", files.cert.string(),
                                     "-days", valid, "-subj", "/CN=loopmoe", "-addext", san,
                                     "-addext", "basicConstraints=critical,CA:FALSE", "-addext",
                                     "keyUsage=critical,digitalSignature,keyEncipherment",
                                     "-addext", "extendedKeyUsage=serverAuth,clientAuth"});
  openssl(cert_args, log);
  // Nothing else is ever signed: without the CA key no one can mint another certificate.
  fs::remove(ca_key);
  fs::remove(log);
  fs::permissions(files.key, fs::perms::owner_read | fs::perms::owner_write,
                  fs::perm_options::replace);
  write_secret(files.cli_token, random_token());
  write_secret(files.process_token, random_token());
  return files;
}

}  // namespace loopmoe::security
