// The job driver's calls to its members (job_driver.h): Configure, RunSteps and the rest go to
// all members at once through call_all, whose first failure cancels the others; Checkpoint and its
// commit rule; Shutdown; and the liveness and interrupt checks between calls.
#include <grpcpp/grpcpp.h>
#include <xxhash.h>

#include <algorithm>
#include <thread>

#include "coordinator/job_driver.h"
#include "coordinator/job_driver_internal.h"
#include "coordinator/util.h"
#include "model/config.h"

namespace loopmoe::coordinator {

using internal::Cancelled;
using internal::code_name;
using internal::format;
using internal::role_name;
using internal::RunFailure;
using internal::Stopping;
using internal::unix_ms;

std::string Member::label() const {
  return id + " (" + role_name(role) + " " + std::to_string(rank) + " at " + address + ")";
}

Member make_member(const std::string& id, v1::Role role, int rank, const std::string& address,
                   const security::Credentials& credentials) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(256 << 20);
  Member m;
  m.id = id;
  m.role = role;
  m.rank = rank;
  m.address = address;
  // The coordinator calls the processes with the process token (and, with mutual TLS, its
  // certificate), as they call it.
  m.stub = v1::TrainingProcess::NewStub(
      security::create_channel(m.address, credentials, credentials.process_token, args));
  return m;
}

void JobDriver::stop() {
  stopping_ = true;
  cancel_calls();
}

void JobDriver::cancel_calls() {
  absl::MutexLock lock(&mu_);
  for (grpc::ClientContext* c : active_) c->TryCancel();
}

void JobDriver::call_all(const char* rpc, std::chrono::milliseconds timeout,
                         const std::function<grpc::Status(Member&, grpc::ClientContext*)>& call) {
  const size_t n = members_.size();
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts(n);
  std::vector<grpc::Status> statuses(n);
  std::vector<char> cancelled_by_us(n, 0);
  {
    absl::MutexLock lock(&mu_);
    for (size_t i = 0; i < n; ++i) {
      contexts[i] = std::make_unique<grpc::ClientContext>();
      contexts[i]->set_deadline(std::chrono::system_clock::now() + timeout);
      active_.insert(contexts[i].get());
    }
  }
  if (stopping_) cancel_calls();  // stop() may have run before these contexts existed
  std::vector<std::thread> threads;
  for (size_t i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      statuses[i] = call(members_[i], contexts[i].get());
      if (!statuses[i].ok()) {
        // One failure fails the step for everyone: don't wait for the others' timeouts.
        absl::MutexLock lock(&mu_);  // also serialises the threads' cancelled_by_us updates
        for (size_t j = 0; j < n; ++j) {
          if (j != i && !cancelled_by_us[j]) {
            cancelled_by_us[j] = 1;
            contexts[j]->TryCancel();
          }
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  {
    absl::MutexLock lock(&mu_);
    for (auto& c : contexts) active_.erase(c.get());
  }
  if (stopping_) throw Stopping{};
  // The root cause: an unreachable process first, then any other error we did not cause.
  int root = -1;
  std::vector<std::string> unreachable;
  for (size_t i = 0; i < n; ++i) {
    if (statuses[i].ok()) continue;
    if (statuses[i].error_code() == grpc::StatusCode::UNAVAILABLE) {
      unreachable.push_back(members_[i].id);
      if (root < 0 || statuses[root].error_code() != grpc::StatusCode::UNAVAILABLE) root = i;
    } else if (root < 0 &&
               !(cancelled_by_us[i] && statuses[i].error_code() == grpc::StatusCode::CANCELLED)) {
      root = i;
    }
  }
  if (root < 0) {
    for (size_t i = 0; i < n && root < 0; ++i) {
      if (!statuses[i].ok()) root = i;
    }
  }
  if (root >= 0) {
    // Every member meets the same reduced gradient norm, so a policy stop is normally everyone's
    // answer; one is enough to make the run's failure permanent.
    bool policy_stop = false;
    std::optional<int64_t> rollback_step;
    for (size_t i = 0; i < n; ++i) {
      if (statuses[i].error_code() == grpc::StatusCode::ABORTED) {
        policy_stop = true;
        if (statuses[root].error_code() != grpc::StatusCode::ABORTED) root = i;
        v1::RunFailure detail;
        if (!statuses[i].error_details().empty() &&
            detail.ParseFromString(statuses[i].error_details()) && detail.has_rollback_step()) {
          rollback_step = detail.rollback_step();
        }
      }
    }
    const grpc::Status& s = statuses[root];
    RunFailure failure(std::string(rpc) + " on " + members_[root].label() +
                           " failed: " + code_name(s.error_code()) + ": " + s.error_message(),
                       unreachable, policy_stop);
    failure.rollback_step = rollback_step;
    throw failure;
  }
}

void JobDriver::check_interrupts() {
  if (stopping_) throw Stopping{};
  if (cancel_) throw Cancelled{};
  for (const Member& m : members_) {
    if (!registry_.is_live(m.id)) {
      throw RunFailure(m.label() + " is dead (no heartbeat for " +
                           std::to_string(options_.heartbeat_timeout.count()) + " ms)",
                       {m.id});
    }
  }
}

void JobDriver::shutdown_members(const std::set<std::string>& skip) {
  std::vector<std::thread> threads;
  for (Member& m : members_) {
    if (skip.count(m.id)) continue;
    threads.emplace_back([&] {
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + options_.shutdown_timeout);
      v1::ShutdownRequest request;
      request.set_job_id(job_id_);
      request.set_exit(false);
      v1::ShutdownResponse response;
      (void)m.stub->Shutdown(&context, request, &response);  // best effort
    });
  }
  for (std::thread& t : threads) t.join();
}

v1::CheckpointMeta JobDriver::checkpoint(const v1::JobStatus& job, const std::string& output_dir,
                                         int64_t step) {
  const std::string dir = output_dir + "/checkpoints/" + format("step-%08lld", (long long)step);
  std::vector<v1::CheckpointResponse> responses(members_.size());
  call_all("Checkpoint", options_.step_timeout, [&](Member& m, grpc::ClientContext* c) {
    v1::CheckpointRequest request;
    request.set_job_id(job_id_);
    request.set_step(step);
    request.set_dir(dir);
    return m.stub->Checkpoint(c, request, &responses[&m - members_.data()]);
  });
  // Every process has fsynced its file: the checkpoint counts once this record is committed.
  const model::Config config = model::parse_config(job.spec().config_toml(), "job " + job.job_id());
  const std::string canonical = model::to_toml(config);
  v1::CheckpointMeta meta;
  meta.set_job_id(job_id_);
  meta.set_step(step);
  meta.set_epoch(job.epoch());
  for (size_t i = 0; i < responses.size(); ++i) {
    v1::CheckpointFile* f = meta.add_files();
    *f = responses[i].file();
    f->set_role(members_[i].role);
    f->set_rank(members_[i].rank);
  }
  *meta.mutable_sampler() = responses[0].sampler();
  meta.set_config_hash(XXH64(canonical.data(), canonical.size(), 0));
  meta.set_num_workers(job.spec().num_workers());
  meta.set_num_shards(job.spec().num_shards());
  meta.set_threads(std::max(1, job.spec().threads()));
  meta.set_created_unix_ms(unix_ms());
  store_.put_checkpoint(meta);
  return meta;
}

}  // namespace loopmoe::coordinator
