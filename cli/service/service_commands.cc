// `loopmoe submit | status | list | cancel | logs`: the user side of the training service, talking
// to the coordinator (docs/SERVICE.md).
#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>

#include "cli/service/service.h"
#include "common/text_file.h"
#include "coordinator/job_spec.h"
#include "proto/loopmoe.grpc.pb.h"
#include "security/credentials.h"
#include "security/generate.h"

namespace loopmoe::cli {
namespace {

namespace v1 = loopmoe::v1;
using coordinator::job_state_name;

std::string default_coordinator() {
  const char* env = std::getenv("LOOPMOE_COORDINATOR");
  return env != nullptr && *env != '\0' ? env : "127.0.0.1:7070";
}

// Where the coordinator is and the credentials to call it with (docs/SERVICE.md "Security").
struct Connection {
  std::string address;
  std::string ca;           // --ca, LOOPMOE_CA
  std::string token_file;   // --token-file, LOOPMOE_TOKEN_FILE (LOOPMOE_TOKEN: the token itself)
  std::string server_name;  // --tls-server-name, LOOPMOE_TLS_SERVER_NAME
  std::string cluster_dir;  // --cluster-dir, LOOPMOE_CLUSTER_DIR: a `loopmoe cluster up --dir`
  bool insecure = false;
};

void add_coordinator_option(CLI::App* cmd, Connection& c) {
  c.address = default_coordinator();
  cmd->add_option("--coordinator", c.address,
                  "coordinator HOST:PORT (default: $LOOPMOE_COORDINATOR or 127.0.0.1:7070)")
      ->capture_default_str();
  cmd->add_option("--ca", c.ca, "PEM CA certificate of the coordinator's TLS certificate")
      ->envname("LOOPMOE_CA");
  cmd->add_option("--token-file", c.token_file,
                  "file holding the CLI token (or the token itself in $LOOPMOE_TOKEN)")
      ->envname("LOOPMOE_TOKEN_FILE");
  cmd->add_option("--tls-server-name", c.server_name,
                  "name the coordinator's certificate is checked for (default: its host)")
      ->envname("LOOPMOE_TLS_SERVER_NAME");
  cmd->add_option("--cluster-dir", c.cluster_dir,
                  "take --ca and --token-file from DIR/credentials of `loopmoe cluster up --dir "
                  "DIR` (default: ./" +
                      std::string(kDefaultClusterDir) + " when it has them)")
      ->envname("LOOPMOE_CLUSTER_DIR");
  cmd->add_flag("--insecure", c.insecure,
                "plaintext, no token: only for a coordinator started with --insecure");
}

// The credentials of `c`: --insecure; else the CA and CLI token from the options, the environment
// or the cluster directory. Throws one clear error when any is missing.
security::Credentials credentials_for(const Connection& c) {
  namespace fs = std::filesystem;
  const char* token_env = std::getenv("LOOPMOE_TOKEN");
  const bool has_token_env = token_env != nullptr && *token_env != '\0';
  if (c.insecure) {
    if (!c.ca.empty() || !c.token_file.empty() || has_token_env) {
      throw std::runtime_error(
          "--insecure cannot be combined with --ca, --token-file or LOOPMOE_TOKEN");
    }
    std::fprintf(stderr, "warning: --insecure: plaintext to the coordinator, no token\n");
    return security::Credentials::Insecure();
  }
  std::string cluster = c.cluster_dir;
  std::error_code ignored;
  if (cluster.empty() && fs::exists(fs::path(kDefaultClusterDir) / "credentials", ignored)) {
    cluster = kDefaultClusterDir;
  }
  const security::CredentialFiles files =
      security::credential_files(fs::path(cluster) / "credentials");
  security::Credentials credentials;
  credentials.server_name = c.server_name;
  const std::string ca = !c.ca.empty() ? c.ca : !cluster.empty() ? files.ca.string() : "";
  const std::string token_file = !c.token_file.empty() ? c.token_file
                                 : !cluster.empty()    ? files.cli_token.string()
                                                       : "";
  if (ca.empty() || (token_file.empty() && !has_token_env)) {
    throw std::runtime_error(
        "no credentials for the coordinator at " + c.address +
        ": give --ca and --token-file (or LOOPMOE_CA and LOOPMOE_TOKEN_FILE or LOOPMOE_TOKEN), "
        "or --cluster-dir DIR of `loopmoe cluster up --dir DIR` (or LOOPMOE_CLUSTER_DIR); "
        "--insecure only for a coordinator started with --insecure");
  }
  credentials.ca_pem = security::read_pem(ca, "--ca");
  if (has_token_env) {
    credentials.cli_token = token_env;
  } else {
    credentials.cli_token = security::read_token(token_file, "--token-file");
  }
  return credentials;
}

// A connected stub, or one clear error within a few seconds when nothing answers.
class Client {
 public:
  explicit Client(const Connection& c) : address_(c.address) {
    const security::Credentials credentials = credentials_for(c);
    stub_ = v1::Coordinator::NewStub(
        security::create_channel(c.address, credentials, credentials.cli_token));
  }

  v1::Coordinator::Stub& stub() { return *stub_; }

  // A context for a unary call that should answer quickly.
  std::unique_ptr<grpc::ClientContext> context(int seconds = 5) {
    auto c = std::make_unique<grpc::ClientContext>();
    c->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
    return c;
  }

  // Throws the user-facing error for a failed call.
  void check(const grpc::Status& status) {
    if (status.ok()) return;
    const std::string& message = status.error_message();
    if (status.error_code() == grpc::StatusCode::UNAVAILABLE &&
        (message.find("andshake") != std::string::npos ||
         message.find("SSL") != std::string::npos)) {
      throw std::runtime_error("TLS handshake with the coordinator at " + address_ + " failed (" +
                               message +
                               "): is --ca the CA of its certificate, and was it started with "
                               "TLS (not --insecure)?");
    }
    if (status.error_code() == grpc::StatusCode::UNAUTHENTICATED ||
        status.error_code() == grpc::StatusCode::PERMISSION_DENIED) {
      throw std::runtime_error("the coordinator at " + address_ +
                               " refused the credentials: " + message +
                               " (check --token-file, LOOPMOE_TOKEN_FILE or LOOPMOE_TOKEN)");
    }
    if (status.error_code() == grpc::StatusCode::UNAVAILABLE ||
        status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
      throw std::runtime_error("cannot reach the coordinator at " + address_ + " (" +
                               status.error_message() + "): is 'loopmoe cluster up' running?");
    }
    throw std::runtime_error(status.error_message());
  }

 private:
  std::string address_;
  std::unique_ptr<v1::Coordinator::Stub> stub_;
};

std::string format_time(int64_t unix_ms) {
  if (unix_ms <= 0) return "-";
  const std::time_t t = static_cast<std::time_t>(unix_ms / 1000);
  std::tm tm{};
  localtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

void print_status(const v1::JobStatus& job) {
  std::printf("job %s%s%s: %s\n", job.job_id().c_str(), job.spec().name().empty() ? "" : " ",
              job.spec().name().c_str(), job_state_name(job.state()));
  std::printf("  step        %lld/%lld\n", static_cast<long long>(job.step()),
              static_cast<long long>(job.total_steps()));
  if (job.step() > 0) {
    std::printf("  loss        %.4f\n", job.loss());
    std::printf("  tokens/s    %.0f\n", job.tokens_per_s());
  }
  if (job.val_loss() > 0) std::printf("  val_loss    %.4f\n", job.val_loss());
  std::printf("  checkpoint  %s\n",
              job.last_checkpoint_step() > 0
                  ? ("step " + std::to_string(job.last_checkpoint_step())).c_str()
                  : "none");
  std::printf("  processes   %d worker(s), %d shard(s)", job.spec().num_workers(),
              job.spec().num_shards());
  for (int i = 0; i < job.process_ids_size(); ++i) {
    std::printf("%s%s", i == 0 ? ": " : ", ", job.process_ids(i).c_str());
  }
  std::printf("\n  epoch       %lld (restarts)\n", static_cast<long long>(job.epoch()));
  std::printf("  submitted   %s\n  updated     %s\n", format_time(job.submitted_unix_ms()).c_str(),
              format_time(job.updated_unix_ms()).c_str());
  if (!job.error().empty()) std::printf("  error       %s\n", job.error().c_str());
}

// Prints the job's log from `from_line`; with `follow`, until the job ends. Returns the job.
v1::JobStatus stream_logs(Client& client, const std::string& job_id, bool follow) {
  grpc::ClientContext context;
  if (!follow) context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  v1::WatchJobRequest request;
  request.set_job_id(job_id);
  request.set_follow(follow);
  {
    // Fail fast when the coordinator is not there (a streaming call would wait for it).
    auto probe = client.context();
    v1::GetJobRequest get;
    get.set_job_id(job_id);
    v1::JobStatus job;
    client.check(client.stub().GetJob(probe.get(), get, &job));
  }
  auto reader = client.stub().WatchJob(&context, request);
  v1::LogLine line;
  while (reader->Read(&line)) {
    std::printf("%s  %s\n", format_time(line.unix_ms()).c_str(), line.text().c_str());
    std::fflush(stdout);
  }
  client.check(reader->Finish());
  auto c = client.context();
  v1::GetJobRequest get;
  get.set_job_id(job_id);
  v1::JobStatus job;
  client.check(client.stub().GetJob(c.get(), get, &job));
  return job;
}

void register_submit(CLI::App& app) {
  auto* cmd = app.add_subcommand("submit", "Submit a training job to the coordinator");
  struct Args {
    std::string file, name, resume_from;
    Connection coordinator;
    int workers = -1, shards = -1, threads = -1;
    bool follow = false;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("JOB.toml", args->file,
                  "training config (as for `loopmoe train`) plus an optional [job] table")
      ->required()
      ->check(CLI::ExistingFile);
  add_coordinator_option(cmd, args->coordinator);
  cmd->add_option("--workers", args->workers, "data-parallel workers (overrides job.workers)");
  cmd->add_option("--shards", args->shards, "expert shards (overrides job.shards)");
  cmd->add_option("--threads", args->threads, "threads per process (overrides job.threads)");
  cmd->add_option("--name", args->name, "job name (overrides job.name)");
  cmd->add_option("--resume-from", args->resume_from,
                  "JOB[:STEP]: start from another job's committed checkpoint (its latest, or "
                  "STEP), e.g. on other worker/shard counts; overrides job.resume_from_job");
  cmd->add_flag("--follow", args->follow, "print the job's log until it ends");
  cmd->callback([args] {
    v1::JobSpec spec =
        coordinator::parse_job_file(common::read_text_as<std::runtime_error>(args->file),
                                    args->file, std::filesystem::current_path().string());
    if (args->workers >= 0) spec.set_num_workers(args->workers);
    if (args->shards >= 0) spec.set_num_shards(args->shards);
    if (args->threads >= 0) spec.set_threads(args->threads);
    if (!args->name.empty()) spec.set_name(args->name);
    if (!args->resume_from.empty()) {
      const size_t colon = args->resume_from.find(':');
      spec.set_resume_from_job(args->resume_from.substr(0, colon));
      if (colon != std::string::npos) {
        try {
          spec.set_resume_step(std::stoll(args->resume_from.substr(colon + 1)));
        } catch (const std::exception&) {
          throw std::runtime_error("--resume-from " + args->resume_from +
                                   ": expected JOB or JOB:STEP");
        }
      }
    }
    // The coordinator checks again, and checks the dataset too (it sees data.dir at the workers'
    // paths, which this machine need not: a laptop submitting through a port-forward).
    coordinator::validate_job_spec(spec, args->file);

    Client client(args->coordinator);
    auto c = client.context();
    v1::SubmitJobRequest request;
    *request.mutable_spec() = spec;
    v1::SubmitJobResponse response;
    client.check(client.stub().SubmitJob(c.get(), request, &response));
    std::printf("submitted job %s\n", response.job_id().c_str());
    std::fflush(stdout);
    if (args->follow) {
      v1::JobStatus job = stream_logs(client, response.job_id(), true);
      if (job.state() != v1::SUCCEEDED) {
        throw std::runtime_error("job " + job.job_id() + " " + job_state_name(job.state()) +
                                 (job.error().empty() ? "" : ": " + job.error()));
      }
    }
  });
}

void register_status(CLI::App& app) {
  auto* cmd = app.add_subcommand("status", "Show a job of the coordinator");
  auto job_id = std::make_shared<std::string>();
  auto address = std::make_shared<Connection>();
  cmd->add_option("JOB_ID", *job_id, "job id (from `loopmoe submit` or `loopmoe list`)")
      ->required();
  add_coordinator_option(cmd, *address);
  cmd->callback([job_id, address] {
    Client client(*address);
    auto c = client.context();
    v1::GetJobRequest request;
    request.set_job_id(*job_id);
    v1::JobStatus job;
    client.check(client.stub().GetJob(c.get(), request, &job));
    print_status(job);
  });
}

void register_list(CLI::App& app) {
  auto* cmd = app.add_subcommand("list", "List the coordinator's jobs");
  auto address = std::make_shared<Connection>();
  add_coordinator_option(cmd, *address);
  cmd->callback([address] {
    Client client(*address);
    auto c = client.context();
    v1::ListJobsResponse response;
    client.check(client.stub().ListJobs(c.get(), v1::ListJobsRequest(), &response));
    if (response.jobs().empty()) {
      std::printf("no jobs\n");
      return;
    }
    std::printf("%-6s %-10s %13s %8s %8s %6s %-19s %s\n", "ID", "STATE", "STEP", "LOSS", "VAL",
                "EPOCH", "SUBMITTED", "NAME");
    for (const v1::JobStatus& job : response.jobs()) {
      const std::string step = std::to_string(job.step()) + "/" + std::to_string(job.total_steps());
      std::printf("%-6s %-10s %13s %8.4f %8.4f %6lld %-19s %s\n", job.job_id().c_str(),
                  job_state_name(job.state()), step.c_str(), job.loss(), job.val_loss(),
                  static_cast<long long>(job.epoch()), format_time(job.submitted_unix_ms()).c_str(),
                  job.spec().name().c_str());
    }
  });
}

void register_cancel(CLI::App& app) {
  auto* cmd = app.add_subcommand("cancel", "Cancel a queued or running job");
  auto job_id = std::make_shared<std::string>();
  auto address = std::make_shared<Connection>();
  cmd->add_option("JOB_ID", *job_id, "job id")->required();
  add_coordinator_option(cmd, *address);
  cmd->callback([job_id, address] {
    Client client(*address);
    auto c = client.context();
    v1::CancelJobRequest request;
    request.set_job_id(*job_id);
    v1::JobStatus job;
    client.check(client.stub().CancelJob(c.get(), request, &job));
    std::printf("job %s: %s (a running job stops after its current step chunk)\n",
                job.job_id().c_str(), job_state_name(job.state()));
  });
}

void register_logs(CLI::App& app) {
  auto* cmd = app.add_subcommand("logs", "Print a job's log");
  auto job_id = std::make_shared<std::string>();
  auto address = std::make_shared<Connection>();
  auto follow = std::make_shared<bool>(false);
  cmd->add_option("JOB_ID", *job_id, "job id")->required();
  add_coordinator_option(cmd, *address);
  cmd->add_flag("--follow,-f", *follow, "keep printing until the job ends");
  cmd->callback([job_id, address, follow] {
    Client client(*address);
    stream_logs(client, *job_id, *follow);
  });
}

}  // namespace

void register_service_commands(CLI::App& app) {
  register_submit(app);
  register_status(app);
  register_list(app);
  register_cancel(app);
  register_logs(app);
}

}  // namespace loopmoe::cli
