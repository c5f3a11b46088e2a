// `loopmoe-coordinator`: the job queue, scheduler and rendezvous store of the LoopMoE training
// service (docs/SERVICE.md).
#include <CLI/CLI.hpp>
#include <csignal>
#include <cstdio>

#include "common/run_main.h"
#include "coordinator/coordinator.h"
#include "security/flags.h"

int main(int argc, char** argv) {
  CLI::App app{"LoopMoE coordinator: queues training jobs and drives workers and expert shards"};
  loopmoe::coordinator::CoordinatorOptions options;
  int64_t heartbeat_timeout_ms = options.heartbeat_timeout.count();
  app.add_option("--listen", options.listen, "gRPC address HOST:PORT")->capture_default_str();
  app.add_option("--data-dir", options.data_dir, "job database (RocksDB) and job outputs")
      ->capture_default_str();
  app.add_option("--metrics-listen", options.metrics_listen,
                 "serve Prometheus /metrics on HOST:PORT (default: off)");
  app.add_option("--heartbeat-timeout-ms", heartbeat_timeout_ms,
                 "a process silent this long is dead")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{100}, int64_t{3600000}));
  app.add_option("--max-restarts", options.max_restarts,
                 "restarts of a failing job before it is FAILED")
      ->capture_default_str()
      ->check(CLI::Range(0, 1000000));
  bool no_data_check = false;
  app.add_flag("--no-data-check", no_data_check,
               "accept jobs without checking their data.dir shards (for a coordinator that cannot "
               "see the workers' files)");
  app.add_option("--data-root", options.data_root,
                 "jobs may write (output_dir) only under this directory (default: "
                 "DATA_DIR/jobs)");
  app.add_option("--health-listen", options.health_listen,
                 "also serve plaintext grpc.health.v1, and nothing else, on HOST:PORT (for "
                 "probes that cannot speak TLS)");
  loopmoe::security::ServerFlags security;
  loopmoe::security::add_server_flags(app, security, /*coordinator=*/true);
  CLI11_PARSE(app, argc, argv);
  options.check_data = !no_data_check;
  options.heartbeat_timeout = std::chrono::milliseconds(heartbeat_timeout_ms);

  // Block the stop signals in every thread (gRPC's included) and take them synchronously here.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  return loopmoe::common::run_main(
      [&] {
        options.security =
            loopmoe::security::load(security, /*coordinator=*/true, "loopmoe-coordinator");
        loopmoe::coordinator::Coordinator coordinator(options);
        std::printf("coordinator listening on %s\n", coordinator.address().c_str());
        if (!coordinator.metrics_address().empty()) {
          std::printf("metrics on http://%s/metrics\n", coordinator.metrics_address().c_str());
        }
        if (!coordinator.health_address().empty()) {
          std::printf("health (plaintext) on %s\n", coordinator.health_address().c_str());
        }
        std::fflush(stdout);
        int signal = 0;
        sigwait(&signals, &signal);
        std::fprintf(stderr, "coordinator: %s, shutting down\n",
                     signal == SIGINT ? "SIGINT" : "SIGTERM");
        coordinator.shutdown();
      },
      loopmoe::common::ErrorLine::kAsIs, "loopmoe-coordinator");
}
