// `loopmoe cluster up`: a coordinator, W workers and S expert shards on this machine, as child
// processes of this command, until Ctrl-C (docs/SERVICE.md).
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "cli/service/service.h"
#include "common/subprocess.h"
#include "coordinator/health.h"
#include "security/credentials.h"
#include "security/generate.h"

namespace loopmoe::cli {
namespace {

namespace fs = std::filesystem;

struct Child {
  std::string name;  // coordinator, worker-0, shard-1, ...
  std::string address;
  std::string metrics;
  fs::path log;
  pid_t pid = -1;
  bool exited = false;
};

fs::path binary_next_to_me(const std::string& name) {
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  if (ec) throw std::runtime_error("cannot read /proc/self/exe: " + ec.message());
  fs::path bin = self.parent_path() / name;
  if (access(bin.c_str(), X_OK) != 0) {
    throw std::runtime_error("cannot find " + bin.string() + " (next to " + self.string() +
                             "): build it, e.g. cmake --build " + self.parent_path().string() +
                             " --target " + name);
  }
  return bin;
}

// Starts `argv` with stdout and stderr appended to `log`, in its own process group so that a
// Ctrl-C in the terminal reaches only us; we stop the children in order.
pid_t spawn(const std::vector<std::string>& argv, const fs::path& log) {
  common::SpawnOptions options;
  options.log = log;
  options.append_log = true;
  options.own_process_group = true;
  // The children get their credentials from the command line only: security settings of this
  // shell (LOOPMOE_TLS_CA, ...) must not mix into them.
  options.keep_env = [](std::string_view var) {
    return !var.starts_with("LOOPMOE_TLS_") && !var.starts_with("LOOPMOE_MTLS=") &&
           !var.starts_with("LOOPMOE_PROCESS_TOKEN_FILE=") &&
           !var.starts_with("LOOPMOE_CLI_TOKEN_FILE=");
  };
  return common::spawn_logged(argv, options);
}

// Reaps children that have exited; returns the first one that did (nullptr if none).
Child* reap(std::vector<Child>& children, std::string* how) {
  Child* first = nullptr;
  for (Child& c : children) {
    if (c.exited) continue;
    int status = 0;
    if (waitpid(c.pid, &status, WNOHANG) == c.pid) {
      c.exited = true;
      if (first == nullptr) {
        first = &c;
        *how = common::exit_description(status);
      }
    }
  }
  return first;
}

void stop_all(std::vector<Child>& children) {
  for (Child& c : children) {
    if (!c.exited) kill(c.pid, SIGTERM);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  std::string how;
  while (std::chrono::steady_clock::now() < deadline) {
    reap(children, &how);
    bool all = true;
    for (const Child& c : children) all = all && c.exited;
    if (all) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (Child& c : children) {
    if (!c.exited) {
      std::fprintf(stderr, "%s (pid %d) did not stop within 10 s: SIGKILL\n", c.name.c_str(),
                   c.pid);
      kill(c.pid, SIGKILL);
      waitpid(c.pid, nullptr, 0);
      c.exited = true;
    }
  }
}

struct Options {
  int workers = 1, shards = 1, port = 7070, metrics_base_port = 0;
  std::string dir = kDefaultClusterDir;
  std::string data_root;  // empty: the current directory
  bool insecure = false;
};

// DIR/cluster.env: `source` it in another shell to use the cluster from there.
void write_cluster_env(const fs::path& path, const std::string& coordinator,
                       const security::CredentialFiles* files) {
  std::ofstream out(path, std::ios::trunc);
  out << "# Written by `loopmoe cluster up`: source it to reach this cluster from another shell.\n"
      << "export LOOPMOE_COORDINATOR=" << coordinator << "\n";
  if (files != nullptr) {
    out << "export LOOPMOE_CA=" << files->ca.string() << "\n"
        << "export LOOPMOE_TOKEN_FILE=" << files->cli_token.string() << "\n";
  }
  if (!out) throw std::runtime_error(path.string() + ": cannot write");
}

void cluster_up(const Options& o) {
  // Signals are taken synchronously (sigtimedwait) so that stopping is ordered.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGCHLD);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  const fs::path coordinator_bin = binary_next_to_me("loopmoe-coordinator");
  const fs::path worker_bin = o.workers > 0 ? binary_next_to_me("loopmoe-worker") : fs::path();
  const fs::path shard_bin = o.shards > 0 ? binary_next_to_me("loopmoe-expert-shard") : fs::path();
  const fs::path dir = fs::absolute(o.dir);
  fs::create_directories(dir / "logs");
  // A fresh CA, certificate and tokens at every start (the CA key is not kept); or none at all.
  std::optional<security::CredentialFiles> files;
  security::Credentials health_credentials = security::Credentials::Insecure();
  std::vector<std::string> coordinator_security, process_security;
  if (o.insecure) {
    std::fprintf(stderr,
                 "warning: --insecure: the cluster serves plaintext gRPC without authentication; "
                 "anyone who can reach its ports can run jobs\n");
    coordinator_security = process_security = {"--insecure"};
  } else {
    files = security::generate_credentials(dir / "credentials");
    health_credentials = security::Credentials();
    health_credentials.ca_pem = security::read_pem(files->ca.string(), "CA");
    process_security = {"--tls-ca",
                        files->ca.string(),
                        "--tls-cert",
                        files->cert.string(),
                        "--tls-key",
                        files->key.string(),
                        "--mtls",
                        "--process-token-file",
                        files->process_token.string()};
    coordinator_security = process_security;
    coordinator_security.insert(coordinator_security.end(),
                                {"--cli-token-file", files->cli_token.string()});
  }
  const std::string data_root =
      fs::absolute(o.data_root.empty() ? fs::current_path() : fs::path(o.data_root)).string();

  std::vector<Child> children;
  auto metrics_for = [&](int index) {
    return o.metrics_base_port > 0 ? "127.0.0.1:" + std::to_string(o.metrics_base_port + index)
                                   : std::string();
  };
  auto start = [&](Child c, std::vector<std::string> argv) {
    if (!c.metrics.empty()) {
      argv.push_back("--metrics-listen");
      argv.push_back(c.metrics);
    }
    c.log = dir / "logs" / (c.name + ".log");
    c.pid = spawn(argv, c.log);
    children.push_back(c);
  };
  auto fail = [&](const std::string& what) {
    stop_all(children);
    throw std::runtime_error(what);
  };
  // Waits until `c` answers health checks; fails if it exits first.
  auto wait_healthy = [&](const Child& c, std::chrono::seconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    // Health is open: TLS (when on) but no token.
    auto channel = security::create_channel(c.address, health_credentials, "");
    while (true) {
      std::string how;
      if (Child* gone = reap(children, &how)) {
        fail(gone->name + " (pid " + std::to_string(gone->pid) + ") " + how +
             " while starting; its log: " + gone->log.string());
      }
      if (coordinator::check_health(channel, std::chrono::milliseconds(200)).serving()) return;
      if (std::chrono::steady_clock::now() > deadline) {
        fail(c.name + " at " + c.address + " did not become healthy within " +
             std::to_string(timeout.count()) + " s; its log: " + c.log.string());
      }
    }
  };

  Child coordinator;
  coordinator.name = "coordinator";
  coordinator.address = "127.0.0.1:" + std::to_string(o.port);
  coordinator.metrics = metrics_for(0);
  std::vector<std::string> coordinator_argv = {coordinator_bin.string(),
                                               "--listen",
                                               coordinator.address,
                                               "--data-dir",
                                               (dir / "coordinator").string(),
                                               "--data-root",
                                               data_root};
  coordinator_argv.insert(coordinator_argv.end(), coordinator_security.begin(),
                          coordinator_security.end());
  start(coordinator, coordinator_argv);
  wait_healthy(children[0], std::chrono::seconds(20));

  // Workers and shards take a free port of the kernel's choosing (port 0; no race with other
  // processes picking ports) and name it in their first log line.
  auto wait_address = [&](Child& c, std::chrono::seconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
      std::string how;
      if (Child* gone = reap(children, &how)) {
        fail(gone->name + " (pid " + std::to_string(gone->pid) + ") " + how +
             " while starting; its log: " + gone->log.string());
      }
      std::ifstream log(c.log);
      std::string line;
      while (std::getline(log, line)) {
        const size_t at = line.find(" listening on ");
        if (at == std::string::npos) continue;
        const size_t begin = at + std::strlen(" listening on ");
        c.address = line.substr(begin, line.find(' ', begin) - begin);
        return;
      }
      if (std::chrono::steady_clock::now() > deadline) {
        fail(c.name + " did not report its address within " + std::to_string(timeout.count()) +
             " s; its log: " + c.log.string());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  };
  for (int i = 0; i < o.workers + o.shards; ++i) {
    const bool worker = i < o.workers;
    Child c;
    c.name = worker ? "worker-" + std::to_string(i) : "shard-" + std::to_string(i - o.workers);
    c.metrics = metrics_for(1 + i);
    std::vector<std::string> argv = {(worker ? worker_bin : shard_bin).string(), "--coordinator",
                                     coordinator.address, "--listen", "127.0.0.1:0"};
    argv.insert(argv.end(), process_security.begin(), process_security.end());
    start(c, argv);
  }
  // A process's server is up before it registers, and it registers within a heartbeat; waiting
  // for every server to answer health is the readiness the service gives us without a new RPC.
  for (size_t i = 1; i < children.size(); ++i) {
    wait_address(children[i], std::chrono::seconds(60));
    wait_healthy(children[i], std::chrono::seconds(60));
  }

  std::printf("cluster up (Ctrl-C stops it):\n");
  for (const Child& c : children) {
    std::printf("  %-12s %-16s pid %-7d %s%s  log %s\n", c.name.c_str(), c.address.c_str(), c.pid,
                c.metrics.empty() ? "" : "metrics http://",
                c.metrics.empty() ? "" : (c.metrics + "/metrics").c_str(), c.log.c_str());
  }
  write_cluster_env(dir / "cluster.env", coordinator.address, files ? &*files : nullptr);
  if (files) {
    std::printf("credentials: CA %s, CLI token %s (TLS; new at every start)\n", files->ca.c_str(),
                files->cli_token.c_str());
  }
  std::printf("jobs may write under %s (--data-root)\n", data_root.c_str());
  std::printf("submit with: loopmoe submit JOB.toml --coordinator %s%s\n",
              coordinator.address.c_str(),
              files ? (" --cluster-dir " + dir.string()).c_str() : " --insecure");
  std::printf("or, in another shell: source %s\n", (dir / "cluster.env").c_str());
  std::fflush(stdout);

  while (true) {
    timespec tick{1, 0};
    const int sig = sigtimedwait(&signals, nullptr, &tick);
    if (sig == SIGINT || sig == SIGTERM) {
      std::printf("\nstopping %zu process(es)...\n", children.size());
      std::fflush(stdout);
      stop_all(children);
      std::printf("cluster stopped\n");
      return;
    }
    std::string how;
    if (Child* gone = reap(children, &how)) {
      fail(gone->name + " (pid " + std::to_string(gone->pid) + ") " + how +
           " unexpectedly; its log: " + gone->log.string() + "; stopped the others");
    }
  }
}

}  // namespace

void register_cluster_command(CLI::App& app) {
  auto* cluster = app.add_subcommand("cluster", "Run the training service on this machine");
  cluster->require_subcommand(1);
  auto* up = cluster->add_subcommand(
      "up", "Start a coordinator, workers and expert shards here; stay in the foreground");
  auto o = std::make_shared<Options>();
  up->add_option("--workers", o->workers, "worker processes")
      ->capture_default_str()
      ->check(CLI::Range(0, 1024));
  up->add_option("--shards", o->shards, "expert shard processes")
      ->capture_default_str()
      ->check(CLI::Range(0, 1024));
  up->add_option("--port", o->port, "coordinator port on 127.0.0.1")
      ->capture_default_str()
      ->check(CLI::Range(1, 65535));
  up->add_option("--dir", o->dir, "logs (DIR/logs) and the coordinator's data (DIR/coordinator)")
      ->capture_default_str();
  up->add_option("--data-root", o->data_root,
                 "jobs may write (output_dir) only under this directory (default: the current "
                 "directory)");
  up->add_flag("--insecure", o->insecure,
               "plaintext gRPC without credentials (default: a throwaway CA, certificate and "
               "tokens in DIR/credentials)");
  up->add_option("--metrics-base-port", o->metrics_base_port,
                 "serve /metrics: coordinator on P, worker i on P+1+i, shard j on P+1+W+j")
      ->check(CLI::Range(1, 65535));
  up->callback([o] { cluster_up(*o); });

  auto* credentials = cluster->add_subcommand(
      "credentials",
      "Write a throwaway CA certificate, a server certificate and the CLI and process tokens "
      "(e.g. for Kubernetes Secrets, deploy/README.md)");
  struct CredentialArgs {
    std::string dir;
    std::vector<std::string> names;
    int days = 365;
  };
  auto c = std::make_shared<CredentialArgs>();
  credentials->add_option("--dir", c->dir, "directory to write them to (created, mode 0700)")
      ->required();
  credentials->add_option("--name", c->names,
                          "extra DNS name or IP address of the certificate (repeatable; it "
                          "always names localhost, 127.0.0.1 and ::1)");
  credentials->add_option("--days", c->days, "validity in days")
      ->capture_default_str()
      ->check(CLI::Range(1, 3650));
  credentials->callback([c] {
    const security::CredentialFiles f =
        security::generate_credentials(fs::absolute(c->dir), c->names, c->days);
    std::printf(
        "CA certificate      %s\nserver certificate  %s\nserver key          %s\n"
        "CLI token           %s\nprocess token       %s\n",
        f.ca.c_str(), f.cert.c_str(), f.key.c_str(), f.cli_token.c_str(), f.process_token.c_str());
  });
}

}  // namespace loopmoe::cli
