#include "security/generate.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "security/credentials.h"

extern char** environ;

namespace loopmoe::security {
namespace {

namespace fs = std::filesystem;

// Runs `openssl args...` with its output in `log`; throws with that output when it fails.
void openssl(const std::vector<std::string>& args, const fs::path& log) {
  std::vector<std::string> argv = {"openssl"};
  argv.insert(argv.end(), args.begin(), args.end());
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0600);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  std::vector<char*> raw;
  for (const std::string& a : argv) raw.push_back(const_cast<char*>(a.c_str()));
  raw.push_back(nullptr);
  pid_t pid = -1;
  const int rc = posix_spawnp(&pid, "openssl", &actions, &attr, raw.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) {
    throw std::runtime_error(std::string("cannot run openssl (") + std::strerror(rc) +
                             "): install the Debian package openssl (scripts/setup.sh)");
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::ifstream in(log);
    std::stringstream text;
    text << in.rdbuf();
    std::string out = text.str();
    while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
    throw std::runtime_error("openssl " + args.at(0) +
                             " failed making credentials: " + (out.empty() ? "no output" : out));
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
