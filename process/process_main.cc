#include "process/process_main.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>
#include <grpcpp/support/channel_arguments.h>
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <utility>

#include "common/run_main.h"
#include "process/roles.h"
#include "security/credentials.h"
#include "security/flags.h"

namespace loopmoe::process {
namespace {

namespace pb = loopmoe::v1;
using std::chrono::milliseconds;

std::string default_name(const std::string& hostname) {
  char host[256] = {};
  std::string name = gethostname(host, sizeof(host) - 1) == 0 ? host : hostname;
  return name + "/" + std::to_string(getpid());
}

// gRPC's default reconnect backoff grows to two minutes: a process started before its
// coordinator (or outliving a coordinator restart) would notice it far too late.
std::shared_ptr<grpc::Channel> coordinator_channel(const std::string& address,
                                                   const security::Credentials& credentials) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  return security::create_channel(address, credentials, credentials.process_token, args);
}

bool retryable(const grpc::Status& status) {
  return status.error_code() == grpc::StatusCode::UNAVAILABLE ||
         status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
}

}  // namespace

ProcessHost::ProcessHost(ProcessOptions options, RuntimeFactory factory)
    : options_(std::move(options)), factory_(std::move(factory)), metrics_(options_.role) {}

ProcessHost::~ProcessHost() { stop(); }

std::string ProcessHost::process_id() const {
  absl::MutexLock lock(&mutex_);
  return process_id_;
}

void ProcessHost::start() {
  if (options_.coordinator.empty()) {
    throw std::runtime_error("no coordinator address (--coordinator or LOOPMOE_COORDINATOR)");
  }
  if (!options_.security.insecure &&
      (options_.security.ca_pem.empty() || options_.security.process_token.empty())) {
    throw std::runtime_error(
        "TLS needs the CA certificate and the process token (--tls-ca, --process-token-file), "
        "or --insecure");
  }
  channel_ = coordinator_channel(options_.coordinator, options_.security);
  coordinator_ = pb::Coordinator::NewStub(channel_);
  store_ = std::make_unique<CoordinatorStore>(channel_, options_.coordinator);

  if (!options_.metrics_listen.empty()) {
    const int port = metrics_.serve(options_.metrics_listen);
    metrics_address_ = options_.hostname + ":" + std::to_string(port);
  }

  TrainingProcessOptions service_options;
  service_options.role = options_.role;
  service_options.factory = factory_;
  service_options.rendezvous_store = store_.get();
  service_options.hostname = options_.hostname;
  service_options.collective_timeout = options_.collective_timeout;
  service_options.rendezvous_timeout = options_.rendezvous_timeout;
  service_options.metrics = &metrics_;
  service_options.request_exit = [this] {
    absl::MutexLock lock(&mutex_);
    exit_requested_ = true;
  };
  service_ = std::make_unique<TrainingProcessServer>(std::move(service_options));

  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int selected_port = 0;
  security::add_exclusive_listening_port(
      builder, options_.listen, security::server_credentials(options_.security), &selected_port);
  builder.RegisterService(service_.get());
  server_ = builder.BuildAndStart();
  if (!server_ || selected_port == 0) {
    server_.reset();
    throw std::runtime_error("cannot listen on " + options_.listen +
                             " (address in use or not local?)");
  }
  address_ = options_.hostname + ":" + std::to_string(selected_port);
  if (!options_.health_listen.empty()) {
    health_ = std::make_unique<security::HealthServer>(options_.health_listen);
    health_->set_serving(true);
  }

  const absl::Time deadline = absl::Now() + absl::FromChrono(options_.connect_timeout);
  grpc::Status status;
  while (true) {
    status = register_once(
        std::clamp(deadline - absl::Now(), absl::Milliseconds(100), absl::Seconds(2)));
    if (status.ok()) break;
    if (!retryable(status)) {
      stop();
      throw std::runtime_error("the coordinator at " + options_.coordinator +
                               " refused to register this " + runtime::to_string(options_.role) +
                               ": " + status.error_message());
    }
    if (absl::Now() + absl::Milliseconds(200) >= deadline) {
      stop();
      const double seconds = std::chrono::duration<double>(options_.connect_timeout).count();
      char waited[32];
      std::snprintf(waited, sizeof(waited), "%g", seconds);
      throw std::runtime_error("cannot reach the coordinator at " + options_.coordinator +
                               " (tried for " + waited + " s): " + status.error_message());
    }
    std::this_thread::sleep_for(milliseconds(200));
  }
  heartbeat_thread_ = std::thread([this] { heartbeat_loop(); });
}

grpc::Status ProcessHost::register_once(absl::Duration timeout) {
  pb::RegisterRequest request;
  request.set_role(to_proto(options_.role));
  request.set_address(address_);
  request.set_metrics_address(metrics_address_);
  request.set_name(options_.name.empty() ? default_name(options_.hostname) : options_.name);
  pb::RegisterResponse response;
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  grpc::Status status = coordinator_->Register(&context, request, &response);
  if (status.ok()) {
    absl::MutexLock lock(&mutex_);
    process_id_ = response.process_id();
    heartbeat_interval_ = absl::Milliseconds(
        response.heartbeat_interval_ms() > 0 ? response.heartbeat_interval_ms() : 1000);
    metrics_.record_heartbeat_ack();
  }
  return status;
}

void ProcessHost::heartbeat_loop() {
  bool lost = false;  // log transitions only, not every failed beat
  while (true) {
    absl::Duration timeout;
    pb::HeartbeatRequest request;
    {
      absl::MutexLock lock(&mutex_);
      if (mutex_.AwaitWithTimeout(absl::Condition(&stopping_), heartbeat_interval_)) return;
      timeout = std::clamp(heartbeat_interval_, absl::Seconds(1), absl::Seconds(10));
      request.set_process_id(process_id_);
    }
    pb::HeartbeatResponse response;
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    grpc::Status status = coordinator_->Heartbeat(&context, request, &response);
    if (status.ok() && response.known()) {
      metrics_.record_heartbeat_ack();
      if (lost)
        std::fprintf(stderr, "heartbeat: coordinator %s reachable again\n",
                     options_.coordinator.c_str());
      lost = false;
    } else if (status.ok()) {
      std::fprintf(stderr,
                   "heartbeat: coordinator %s does not know process %s (restarted?); "
                   "registering again\n",
                   options_.coordinator.c_str(), request.process_id().c_str());
      grpc::Status registered = register_once(timeout);
      if (registered.ok()) {
        std::fprintf(stderr, "registered again as %s\n", process_id().c_str());
        lost = false;
      } else {
        std::fprintf(stderr, "heartbeat: registering again failed: %s\n",
                     registered.error_message().c_str());
        lost = true;
      }
    } else if (!lost) {
      std::fprintf(stderr, "heartbeat: coordinator %s unreachable: %s\n",
                   options_.coordinator.c_str(), status.error_message().c_str());
      lost = true;
    }
  }
}

bool ProcessHost::wait_for_exit_request(milliseconds timeout) {
  absl::MutexLock lock(&mutex_);
  return mutex_.AwaitWithTimeout(absl::Condition(&exit_requested_), absl::FromChrono(timeout));
}

void ProcessHost::stop(milliseconds grace) {
  {
    absl::MutexLock lock(&mutex_);
    stopping_ = true;
  }
  if (heartbeat_thread_.joinable()) heartbeat_thread_.join();
  if (health_) health_->shutdown();
  if (server_) {
    server_->Shutdown(std::chrono::system_clock::now() + grace);
    server_->Wait();
    server_.reset();
  }
}

int process_main(runtime::Role role, int argc, char** argv, RuntimeFactory factory) {
  // Blocked here, before gRPC starts any thread, so every thread inherits the mask and the
  // signals wait for sigtimedwait below instead of killing the process mid-RPC.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  const std::string program =
      role == runtime::Role::kWorker ? "loopmoe-worker" : "loopmoe-expert-shard";
  CLI::App app{role == runtime::Role::kWorker
                   ? "LoopMoE worker: embedding, attention, IterAdaLN, router and head of a "
                     "distributed training job (data parallel)"
                   : "LoopMoE expert shard: the expert FFNs of a distributed training job "
                     "(expert parallel)",
               program};
  ProcessOptions options;
  options.role = role;
  double connect_timeout_s = 30, rendezvous_timeout_s = 120, collective_timeout_s = 60;
  app.add_option("--coordinator", options.coordinator, "coordinator address HOST:PORT")
      ->envname("LOOPMOE_COORDINATOR")
      ->required();
  app.add_option("--listen", options.listen,
                 "address of this process's RPC server (port 0 picks a free port)")
      ->capture_default_str();
  app.add_option("--metrics-listen", options.metrics_listen,
                 "serve Prometheus /metrics on HOST:PORT (default: no metrics server)");
  app.add_option("--health-listen", options.health_listen,
                 "also serve plaintext grpc.health.v1, and nothing else, on HOST:PORT (for probes "
                 "that cannot speak TLS)");
  app.add_option("--hostname", options.hostname,
                 "address other processes and the coordinator reach this one at (RPC and Gloo)")
      ->capture_default_str();
  app.add_option("--name", options.name, "name shown by the coordinator (default HOSTNAME/PID)");
  app.add_option("--connect-timeout", connect_timeout_s,
                 "seconds to keep trying to register with the coordinator")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--rendezvous-timeout", rendezvous_timeout_s,
                 "seconds to wait for the other processes of a job")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--collective-timeout", collective_timeout_s,
                 "seconds a collective waits for a peer before the job is failed")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  security::ServerFlags security_flags;
  security::add_server_flags(app, security_flags, /*coordinator=*/false);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  auto to_ms = [](double seconds) { return milliseconds(static_cast<int64_t>(seconds * 1000)); };
  options.connect_timeout = to_ms(connect_timeout_s);
  options.rendezvous_timeout = to_ms(rendezvous_timeout_s);
  options.collective_timeout = to_ms(collective_timeout_s);

  std::optional<ProcessHost> host;
  const int started = common::run_main(
      [&] {
        options.security = security::load(security_flags, /*coordinator=*/false, program);
        host.emplace(options, std::move(factory));
        host->start();
      },
      common::ErrorLine::kAsIs, program.c_str());
  if (started != 0) return started;
  std::printf("%s listening on %s (coordinator %s)\n", runtime::to_string(role),
              host->address().c_str(), options.coordinator.c_str());
  if (!host->metrics_address().empty()) {
    std::printf("metrics on http://%s/metrics\n", host->metrics_address().c_str());
  }
  std::fflush(stdout);

  const timespec poll = {0, 100 * 1000 * 1000};
  while (true) {
    const int signal = sigtimedwait(&stop_signals, nullptr, &poll);
    if (signal > 0) {
      std::fprintf(stderr, "%s: %s, shutting down\n", program.c_str(),
                   signal == SIGINT ? "SIGINT" : "SIGTERM");
      break;
    }
    if (host->wait_for_exit_request(milliseconds(0))) {
      std::fprintf(stderr, "%s: exit requested by the coordinator\n", program.c_str());
      break;
    }
  }
  // A request blocked inside the runtime (a rendezvous or a collective waiting for dead peers)
  // cannot be interrupted; do not let it hold the process past its timeouts' worth of patience.
  std::thread([program] {
    std::this_thread::sleep_for(std::chrono::seconds(15));
    std::fprintf(stderr, "%s: a request is still running in the runtime; exiting anyway\n",
                 program.c_str());
    std::_Exit(0);
  }).detach();
  host->stop();
  return 0;
}

}  // namespace loopmoe::process
