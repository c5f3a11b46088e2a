// Kill tests (issue 11 item 4): the service's real executables as child processes, secured as
// deployed (TLS, mutual TLS, tokens).
// - CoordinatorSigkillMidJob...: loopmoe-coordinator, two loopmoe-worker and two
//   loopmoe-expert-shard processes run one job; the coordinator is SIGKILLed mid-run, after a
//   committed checkpoint and with steps past it, and restarted on the same --data-dir and port
//   (the processes only know that address). The processes re-register, the job is requeued as
//   epoch 1, resumes from its checkpoint and ends SUCCEEDED with the loss curve of `loopmoe train`
//   (train::run_training) bit for bit and the final weights, AdamW moments and data position of
//   an uninterrupted run of the same layout.
// - MemberKilledDuringTheRendezvous...: a worker killed while the others wait for it in the
//   rendezvous does not hold them (and so the job's restart) for the rendezvous timeout.
// - ProcessIdsAreNotReused...: in-process, the registry's ids across a coordinator restart.
// scripts/kill_soak.sh kills random processes of one job many times (docs/SERVICE.md "Kill tests").
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "coordinator/coordinator.h"
#include "proto/loopmoe.grpc.pb.h"
#include "runtime/process_checkpoint.h"
#include "security/credentials.h"
#include "tests/cluster/cluster_fixture.h"
#include "tests/security/test_credentials.h"

extern char** environ;

namespace loopmoe::runtime::testing {
namespace {

namespace pb = loopmoe::v1;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

std::string read_text(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// The last lines of a log, for failure messages.
std::string tail(const fs::path& path, size_t lines = 15) {
  const std::string text = read_text(path);
  size_t at = text.size();
  for (size_t n = 0; n <= lines && at > 0;) {
    if (text[--at] == '\n') ++n;
  }
  return "--- " + path.string() + "\n" + text.substr(at) + "\n";
}

// An executable of the build as a child process, stdout and stderr appended to `log`, in its own
// process group; SIGKILLed when destroyed.
class Child {
 public:
  Child(const std::string& exe, const std::vector<std::string>& args, fs::path log)
      : log_(std::move(log)) {
    std::vector<std::string> argv_s = {std::string(LOOPMOE_BUILD_DIR) + "/" + exe};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    std::vector<std::string> env_s;
    for (char** e = environ; *e; ++e) {
      // None of the caller's LOOPMOE_* settings (coordinator, TLS files, tokens) leak in.
      if (!std::string(*e).starts_with("LOOPMOE_")) env_s.push_back(*e);
    }
    std::vector<char*> argv, envp;
    for (std::string& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    for (std::string& e : env_s) envp.push_back(e.data());
    envp.push_back(nullptr);
    // Only async-signal-safe calls between fork and exec: this process has threads.
    pid_ = ::fork();
    if (pid_ == 0) {
      ::setpgid(0, 0);
      const int fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      ::execve(argv[0], argv.data(), envp.data());
      ::_exit(127);
    }
  }
  ~Child() { kill(); }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  void kill() {
    if (pid_ > 0 && !exited_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      exited_ = true;
    }
  }
  bool running() {
    if (exited_) return false;
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) exited_ = true;
    return !exited_;
  }
  pid_t pid() const { return pid_; }
  const fs::path& log() const { return log_; }

 private:
  fs::path log_;
  pid_t pid_ = -1;
  bool exited_ = false;
};

// Waits up to `timeout` for `pattern`'s first group in the child's log; "" if the child exits.
std::string await_logged(Child& child, const std::string& pattern,
                         std::chrono::seconds timeout = 60s) {
  const std::regex re(pattern);
  for (const auto deadline = Clock::now() + timeout; Clock::now() < deadline;) {
    const std::string text = read_text(child.log());
    std::smatch m;
    if (std::regex_search(text, m, re)) return m[1].str();
    if (!child.running()) break;
    std::this_thread::sleep_for(20ms);
  }
  return "";
}

struct MetricsRecords {
  std::map<int64_t, double> loss, val_loss;
  int duplicates = 0;
};

// The job's metrics.jsonl ("step" and "loss" or "val_loss", written with %.17g: exact doubles).
MetricsRecords read_metrics(const fs::path& path) {
  MetricsRecords r;
  std::ifstream in(path);
  std::string line;
  const std::regex step_re("\"step\": (\\d+)"), loss_re("\"loss\": ([-+0-9.eE]+)"),
      val_re("\"val_loss\": ([-+0-9.eEnaif]+)");
  while (std::getline(in, line)) {
    std::smatch step, value;
    if (!std::regex_search(line, step, step_re)) continue;
    const int64_t s = std::stoll(step[1]);
    auto& into = std::regex_search(line, value, val_re) ? r.val_loss : r.loss;
    if (&into == &r.loss && !std::regex_search(line, value, loss_re)) continue;
    if (into.count(s)) ++r.duplicates;
    into[s] = std::stod(value[1]);
  }
  return r;
}

class ClusterKillTest : public ClusterTest {
 protected:
  // Secured like `loopmoe cluster up`: the coordinator gets both tokens, the processes the process
  // token, everyone the certificate with mutual TLS.
  std::vector<std::string> server_flags(bool coordinator) const {
    const security::CredentialFiles& f = security::testing::test_credential_files();
    std::vector<std::string> flags = {
        "--tls-ca",  f.ca.string(),  "--tls-cert",           f.cert.string(),
        "--tls-key", f.key.string(), "--process-token-file", f.process_token.string(),
        "--mtls"};
    if (coordinator) {
      flags.insert(flags.end(), {"--cli-token-file", f.cli_token.string()});
    }
    return flags;
  }
  // Each start logs to its own file (coordinator-N.log).
  std::unique_ptr<Child> start_coordinator(const std::string& listen) {
    ++coordinator_starts_;
    std::vector<std::string> args = {
        "--listen", listen, "--data-dir", (dir_ / "coord").string(), "--heartbeat-timeout-ms",
        "2000"};
    for (const std::string& f : server_flags(true)) args.push_back(f);
    return std::make_unique<Child>(
        "loopmoe-coordinator", args,
        dir_ / ("coordinator-" + std::to_string(coordinator_starts_) + ".log"));
  }
  std::unique_ptr<pb::Coordinator::Stub> cli(const std::string& address) {
    const security::Credentials c = security::testing::cli_credentials();
    return pb::Coordinator::NewStub(security::create_channel(address, c, c.cli_token));
  }
  std::string logs(const std::vector<const Child*>& children) {
    std::string out;
    for (const Child* c : children) out += tail(c->log());
    return out;
  }
  int coordinator_starts_ = 0;
};

std::optional<pb::JobStatus> get_job(pb::Coordinator::Stub& stub, const std::string& id) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + 5s);
  pb::GetJobRequest request;
  request.set_job_id(id);
  pb::JobStatus job;
  if (!stub.GetJob(&context, request, &job).ok()) return std::nullopt;
  return job;
}

std::vector<std::string> job_log(pb::Coordinator::Stub& stub, const std::string& id) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + 30s);
  pb::WatchJobRequest request;
  request.set_job_id(id);
  auto reader = stub.WatchJob(&context, request);
  std::vector<std::string> lines;
  pb::LogLine line;
  while (reader->Read(&line)) lines.push_back(line.text());
  EXPECT_TRUE(reader->Finish().ok());
  return lines;
}

TEST_F(ClusterKillTest, CoordinatorSigkillMidJobFinishesOnTheSameCurve) {
  model::Config c = testing::tiny_loopmoe_config(dir_ / "data");
  c.train.steps = 60;
  c.train.warmup_steps = 5;
  c.train.checkpoint_interval = 10;
  c.train.eval_interval = 20;
  c.train.log_interval = 1;  // every step's loss in metrics.jsonl (and one step per chunk)
  constexpr int kWorkers = 2, kShards = 2;

  // The references: `loopmoe train` in this process, and the same layout uninterrupted (threads
  // of this process, as in the cluster tests), evaluated and checkpointed where the job is.
  const std::vector<double> single = single_process_losses(c, dir_ / "single");
  const MetricsRecords single_metrics = read_metrics(dir_ / "single" / "metrics.jsonl");
  std::map<int64_t, double> straight_val;
  ResumePoint straight;
  {
    ThreadCluster cluster(c, kWorkers, kShards);
    for (int done = 0; done < c.train.steps; done += c.train.eval_interval) {
      cluster.steps(c.train.eval_interval, c.model.n_loops);
      straight_val[done + c.train.eval_interval] = cluster.evaluate(c.train.eval_batches);
    }
    straight = cluster.checkpoint(dir_ / "straight");
  }

  // The cluster: the coordinator on a port the kernel picks, kept across its restart.
  std::unique_ptr<Child> coordinator = start_coordinator("127.0.0.1:0");
  const std::string address =
      await_logged(*coordinator, "coordinator listening on (127\\.0\\.0\\.1:\\d+)\\n");
  ASSERT_FALSE(address.empty()) << tail(coordinator->log());
  std::vector<std::unique_ptr<Child>> processes;
  for (int i = 0; i < kWorkers + kShards; ++i) {
    const bool worker = i < kWorkers;
    // A coordinator killed while it sends a chunk's RunSteps may reach only some processes; those
    // wait in their collective for the others until --collective-timeout (default 60 s) before
    // they can join the restarted run. 20 s keeps that case short.
    std::vector<std::string> args = {
        "--coordinator",        address, "--name", (worker ? "w" : "s") + std::to_string(i),
        "--collective-timeout", "20"};
    for (const std::string& f : server_flags(false)) args.push_back(f);
    processes.push_back(std::make_unique<Child>(
        worker ? "loopmoe-worker" : "loopmoe-expert-shard", args,
        dir_ / ((worker ? "worker" : "shard") + std::to_string(i) + ".log")));
  }
  const auto all_logs = [&] {
    std::vector<const Child*> children = {coordinator.get()};
    for (const auto& p : processes) children.push_back(p.get());
    return logs(children);
  };

  std::unique_ptr<pb::Coordinator::Stub> stub = cli(address);
  pb::SubmitJobRequest submit;
  submit.mutable_spec()->set_name("kill");
  submit.mutable_spec()->set_config_toml(model::to_toml(c));
  submit.mutable_spec()->set_num_workers(kWorkers);
  submit.mutable_spec()->set_num_shards(kShards);
  pb::SubmitJobResponse submitted;
  {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 30s);
    context.set_wait_for_ready(true);
    const grpc::Status s = stub->SubmitJob(&context, submit, &submitted);
    ASSERT_TRUE(s.ok()) << s.error_message() << "\n" << all_logs();
  }
  const std::string id = submitted.job_id();
  const Clock::time_point submitted_at = Clock::now();
  const fs::path run_dir = dir_ / "coord" / "jobs" / id;

  // Mid-run: a committed checkpoint and at least 3 steps past it (their metrics.jsonl records
  // must be dropped by the resumed run), well before the end.
  pb::JobStatus at_kill;
  for (const auto deadline = Clock::now() + 300s;;) {
    ASSERT_LT(Clock::now(), deadline) << "no checkpoint committed in 300 s\n" << all_logs();
    std::optional<pb::JobStatus> job = get_job(*stub, id);
    ASSERT_TRUE(job) << all_logs();
    ASSERT_NE(job->state(), pb::SUCCEEDED) << "the job ran to the end before the kill";
    ASSERT_TRUE(job->state() == pb::RUNNING || job->state() == pb::STARTING ||
                job->state() == pb::QUEUED)
        << pb::JobState_Name(job->state()) << ": " << job->error() << "\n"
        << all_logs();
    if (job->state() == pb::RUNNING && job->last_checkpoint_step() >= 10 &&
        job->step() >= job->last_checkpoint_step() + 3) {
      at_kill = *job;
      break;
    }
    std::this_thread::sleep_for(10ms);
  }
  coordinator->kill();
  ASSERT_LT(at_kill.step(), c.train.steps);
  ASSERT_EQ(at_kill.epoch(), 0);
  const auto seconds_since = [](Clock::time_point t) {
    return std::chrono::duration<double>(Clock::now() - t).count();
  };
  std::printf(
      "killed the coordinator %.1f s after the submission, at step %lld (checkpoint %lld "
      "committed)\n",
      seconds_since(submitted_at), static_cast<long long>(at_kill.step()),
      static_cast<long long>(at_kill.last_checkpoint_step()));
  const Clock::time_point killed_at = Clock::now();
  const MetricsRecords before_restart = read_metrics(run_dir / "metrics.jsonl");
  ASSERT_FALSE(before_restart.loss.empty());
  EXPECT_GT(before_restart.loss.rbegin()->first, at_kill.last_checkpoint_step());

  // Restarted on the same data dir and port (retried: the port is free again once the kernel has
  // closed the dead process's socket).
  for (int attempt = 1;; ++attempt) {
    coordinator = start_coordinator(address);
    if (!await_logged(*coordinator, "coordinator listening on (127\\.0\\.0\\.1:\\d+)\\n").empty()) {
      break;
    }
    ASSERT_LT(attempt, 20) << "the coordinator does not restart on " << address << "\n"
                           << tail(coordinator->log());
    std::this_thread::sleep_for(500ms);
  }
  stub = cli(address);  // a new channel: the old one backs off after the failures

  pb::JobStatus done;
  for (const auto deadline = Clock::now() + 300s;;) {
    ASSERT_LT(Clock::now(), deadline) << "the job did not finish within 300 s of the restart\n"
                                      << all_logs();
    std::optional<pb::JobStatus> job = get_job(*stub, id);
    if (job && (job->state() == pb::SUCCEEDED || job->state() == pb::FAILED ||
                job->state() == pb::CANCELLED)) {
      done = *job;
      break;
    }
    std::this_thread::sleep_for(50ms);
  }
  std::printf("the job ended %s %.1f s after the kill\n", pb::JobState_Name(done.state()).c_str(),
              seconds_since(killed_at));
  ASSERT_EQ(done.state(), pb::SUCCEEDED) << done.error() << "\n" << all_logs();
  EXPECT_EQ(done.step(), c.train.steps);
  EXPECT_EQ(done.epoch(), 1) << "one restart: the coordinator's";
  // The same processes ran the rest: they re-registered with the new coordinator.
  for (auto& p : processes) {
    EXPECT_TRUE(p->running()) << tail(p->log());
    EXPECT_NE(read_text(p->log()).find("registering again"), std::string::npos) << tail(p->log());
  }
  const std::vector<std::string> lines = job_log(*stub, id);
  const auto logged = [&](const std::string& prefix) -> std::string {
    for (const std::string& l : lines) {
      if (l.starts_with(prefix)) return l;
    }
    return "";
  };
  const std::string requeued = logged("coordinator restarted: job requeued as epoch 1");
  ASSERT_FALSE(requeued.empty()) << all_logs();
  const std::regex resumed_re("resumes from step (\\d+)");
  std::smatch resumed;
  ASSERT_TRUE(std::regex_search(requeued, resumed, resumed_re)) << requeued;
  const int64_t resume_step = std::stoll(resumed[1]);
  EXPECT_GE(resume_step, at_kill.last_checkpoint_step()) << requeued;
  EXPECT_LT(resume_step, c.train.steps) << requeued;
  EXPECT_NE(logged("epoch 1: starting on ").find("resuming from step " + resumed[1].str()),
            std::string::npos);

  // The loss curve: every step once, equal to `loopmoe train`'s bit for bit; validations equal
  // the uninterrupted layout's bit for bit and `loopmoe train`'s to its 8 printed digits.
  const MetricsRecords got = read_metrics(run_dir / "metrics.jsonl");
  EXPECT_EQ(got.duplicates, 0);
  ASSERT_EQ(got.loss.size(), single.size());
  for (const auto& [step, loss] : got.loss) {
    ASSERT_TRUE(step >= 1 && step <= static_cast<int64_t>(single.size())) << step;
    EXPECT_EQ(loss, single[step - 1]) << "step " << step;
  }
  EXPECT_EQ(got.val_loss, straight_val);
  ASSERT_EQ(single_metrics.val_loss.size(), straight_val.size());
  for (const auto& [step, val] : single_metrics.val_loss) {
    EXPECT_NEAR(got.val_loss.at(step), val, 1e-7 * std::abs(val)) << "step " << step;
  }

  // The final checkpoint: the committed files hold what the uninterrupted run's hold.
  pb::ListCheckpointsResponse checkpoints;
  {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 30s);
    pb::ListCheckpointsRequest request;
    request.set_job_id(id);
    ASSERT_TRUE(stub->ListCheckpoints(&context, request, &checkpoints).ok());
  }
  ASSERT_GT(checkpoints.checkpoints_size(), 0);
  const pb::CheckpointMeta& last = *checkpoints.checkpoints().rbegin();
  ASSERT_EQ(last.step(), c.train.steps);
  ASSERT_EQ(last.files_size(), kWorkers + kShards);
  for (const pb::CheckpointFile& f : last.files()) {
    const Role role = f.role() == pb::WORKER ? Role::kWorker : Role::kExpertShard;
    const CheckpointFileRef& want =
        straight.files[(role == Role::kWorker ? 0 : kWorkers) + f.rank()];
    ASSERT_EQ(want.role, role);
    ASSERT_EQ(want.rank, f.rank());
    SCOPED_TRACE(f.path());
    if (role == Role::kWorker) {
      const WorkerCheckpoint a = read_worker_checkpoint(want.path, want.xxh64);
      const WorkerCheckpoint b = read_worker_checkpoint(f.path(), f.xxh64());
      EXPECT_EQ(b.step, a.step);
      EXPECT_EQ(b.adam_steps, a.adam_steps);
      EXPECT_EQ(b.sampler.seed, a.sampler.seed);
      EXPECT_EQ(b.sampler.epoch, a.sampler.epoch);
      EXPECT_EQ(b.sampler.index, a.sampler.index);
      EXPECT_TRUE(b.params == a.params) << "parameters differ";
      EXPECT_TRUE(b.m == a.m) << "AdamW m differs";
      EXPECT_TRUE(b.v == a.v) << "AdamW v differs";
    } else {
      const ShardCheckpoint a = read_shard_checkpoint(want.path, want.xxh64);
      const ShardCheckpoint b = read_shard_checkpoint(f.path(), f.xxh64());
      EXPECT_EQ(b.step, a.step);
      EXPECT_EQ(b.adam_steps, a.adam_steps);
      EXPECT_EQ(b.first_expert, a.first_expert);
      EXPECT_EQ(b.num_experts, a.num_experts);
      EXPECT_TRUE(b.params == a.params) << "expert parameters differ";
      EXPECT_TRUE(b.m == a.m) << "AdamW m differs";
      EXPECT_TRUE(b.v == a.v) << "AdamW v differs";
    }
    EXPECT_EQ(f.xxh64(), want.xxh64) << "the files differ (header or payload)";
  }
}

// What a kill during the rendezvous found: the survivors waited in their Configure for the dead
// member's rendezvous keys for the whole --rendezvous-timeout (120 s by default), and the job's
// restart could not configure them meanwhile. Now a Configure the coordinator cancelled (it failed
// the run) stops waiting at once (process/coordinator_store.h, AbandonWaitsIf). Deterministic: a
// worker stopped (SIGSTOP) before the submission is assigned (the heartbeat timeout is long) and
// never publishes its rendezvous keys; the other worker and the shard publish theirs and wait for
// it; then it is SIGKILLed (should gRPC give up connecting to the stopped worker first, Configure
// fails UNAVAILABLE the same way). The processes wait up to 600 s for a rendezvous, so the job
// could not succeed in the 300 s it is given if they waited for the dead worker's keys.
TEST_F(ClusterKillTest, MemberKilledDuringTheRendezvousDoesNotHoldTheRestart) {
  model::Config c = testing::tiny_loopmoe_config(dir_ / "data");
  c.train.steps = 6;
  std::vector<std::string> args = {
      "--listen", "127.0.0.1:0", "--data-dir", (dir_ / "coord").string(), "--heartbeat-timeout-ms",
      "120000"};
  for (const std::string& f : server_flags(true)) args.push_back(f);
  Child coordinator("loopmoe-coordinator", args, dir_ / "coordinator.log");
  const std::string address =
      await_logged(coordinator, "coordinator listening on (127\\.0\\.0\\.1:\\d+)\\n");
  ASSERT_FALSE(address.empty()) << tail(coordinator.log());
  std::vector<std::unique_ptr<Child>> processes;
  // Started one by one (each registers before it logs "listening"), so the first two workers
  // and the shard are the earliest registered: the ones the job gets.
  const auto start = [&](const std::string& exe, const std::string& name) {
    std::vector<std::string> a = {"--coordinator",        address, "--name", name,
                                  "--rendezvous-timeout", "600"};
    for (const std::string& f : server_flags(false)) a.push_back(f);
    processes.push_back(std::make_unique<Child>(exe, a, dir_ / (name + ".log")));
    ASSERT_FALSE(await_logged(*processes.back(), "(listening) on").empty())
        << tail(processes.back()->log());
  };
  start("loopmoe-worker", "w0");
  start("loopmoe-worker", "w1");
  start("loopmoe-expert-shard", "s0");
  Child& stopped = *processes[1];
  ASSERT_EQ(::kill(stopped.pid(), SIGSTOP), 0);

  std::unique_ptr<pb::Coordinator::Stub> stub = cli(address);
  pb::SubmitJobRequest submit;
  submit.mutable_spec()->set_config_toml(model::to_toml(c));
  submit.mutable_spec()->set_num_workers(2);
  submit.mutable_spec()->set_num_shards(1);
  pb::SubmitJobResponse submitted;
  {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 30s);
    ASSERT_TRUE(stub->SubmitJob(&context, submit, &submitted).ok());
  }
  const std::string id = submitted.job_id();
  // The rendezvous keys of epoch 0 (world ranks: workers, then the shard; Gloo's keys "<rank>"
  // and "rank_<rank>") as the process token reads them: ranks 0 and 2 published.
  const security::Credentials process = security::testing::process_credentials();
  auto kv =
      pb::Coordinator::NewStub(security::create_channel(address, process, process.process_token));
  int published = 0;
  for (const auto deadline = Clock::now() + 120s; published < 2;) {
    ASSERT_LT(Clock::now(), deadline)
        << "the others did not publish their rendezvous keys\n"
        << logs({&coordinator, processes[0].get(), processes[2].get()});
    published = 0;
    for (int rank : {0, 2}) {
      bool found = false;
      for (const std::string& key : {std::to_string(rank), "rank_" + std::to_string(rank)}) {
        grpc::ClientContext context;
        context.set_deadline(std::chrono::system_clock::now() + 10s);
        pb::KvGetRequest request;
        request.set_key("job/" + id + "/epoch/0/gloo/world/" + key);
        pb::KvGetResponse response;
        ASSERT_TRUE(kv->KvGet(&context, request, &response).ok());
        found = found || response.found();
      }
      published += found;
    }
    std::this_thread::sleep_for(20ms);
  }
  std::optional<pb::JobStatus> job;

  // A spare worker for the restart, then the stopped one dies.
  start("loopmoe-worker", "w2");
  stopped.kill();
  const Clock::time_point killed_at = Clock::now();
  for (const auto deadline = killed_at + 300s;;) {
    ASSERT_LT(Clock::now(), deadline)
        << "the job did not finish within 300 s of the kill (the survivors still wait for the "
           "dead worker's rendezvous key?)\n"
        << logs({&coordinator, processes[0].get(), processes[2].get(), processes[3].get()});
    job = get_job(*stub, id);
    if (job && job->state() != pb::QUEUED && job->state() != pb::STARTING &&
        job->state() != pb::RUNNING) {
      break;
    }
    std::this_thread::sleep_for(50ms);
  }
  std::printf("the job ended %s %.1f s after the kill\n", pb::JobState_Name(job->state()).c_str(),
              std::chrono::duration<double>(Clock::now() - killed_at).count());
  ASSERT_EQ(job->state(), pb::SUCCEEDED) << job->error();
  EXPECT_EQ(job->epoch(), 1);
  EXPECT_EQ(job->step(), c.train.steps);
  for (const Child* survivor : {processes[0].get(), processes[2].get()}) {
    EXPECT_NE(read_text(survivor->log()).find("rendezvous abandoned"), std::string::npos)
        << tail(survivor->log());
  }
}

// What the kill above found: a restarted coordinator numbered process ids from 1 again, so a new
// registration could get the id an old process still heartbeated with; that process was then
// never told to register again and was lost to the scheduler (a 2 + 2 job waited forever). Ids
// now continue across restarts (the counter is in the database).
TEST_F(ClusterKillTest, ProcessIdsAreNotReusedAfterACoordinatorRestart) {
  coordinator::CoordinatorOptions options;
  options.listen = "127.0.0.1:0";
  options.data_dir = (dir_ / "coord").string();
  options.security = security::Credentials::Insecure();
  const auto register_worker = [](const std::string& address, const std::string& name) {
    auto stub =
        pb::Coordinator::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 10s);
    pb::RegisterRequest request;
    request.set_role(pb::WORKER);
    request.set_address("127.0.0.1:1" + name);  // never called: no job is submitted
    request.set_name(name);
    pb::RegisterResponse response;
    EXPECT_TRUE(stub->Register(&context, request, &response).ok());
    return response.process_id();
  };
  const auto heartbeat_known = [](const std::string& address, const std::string& id) {
    auto stub =
        pb::Coordinator::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 10s);
    pb::HeartbeatRequest request;
    request.set_process_id(id);
    pb::HeartbeatResponse response;
    EXPECT_TRUE(stub->Heartbeat(&context, request, &response).ok());
    return response.known();
  };
  std::vector<std::string> before;
  {
    coordinator::Coordinator first(options);
    before = {register_worker(first.address(), "1"), register_worker(first.address(), "2")};
  }
  EXPECT_EQ(before, (std::vector<std::string>{"worker-1", "worker-2"}));
  coordinator::Coordinator second(options);
  const std::string again = register_worker(second.address(), "2");  // the second one first
  EXPECT_EQ(again, "worker-3");
  EXPECT_FALSE(heartbeat_known(second.address(), before[0])) << "must register again";
  EXPECT_FALSE(heartbeat_known(second.address(), before[1])) << "must register again";
  EXPECT_TRUE(heartbeat_known(second.address(), again));
}

}  // namespace
}  // namespace loopmoe::runtime::testing
