// The FIFO scheduler (scheduler.h) and the coordinator's scheduler thread, which starts a
// JobDriver thread for each job it places and reaps the drivers that have finished.
#include "coordinator/scheduler.h"

#include <absl/time/time.h>

#include <chrono>

#include "coordinator/coordinator_impl.h"
#include "coordinator/util.h"

namespace loopmoe::coordinator {

using internal::job_number;
using internal::unix_ms;

std::optional<Assignment> assign_next(
    std::set<int64_t>& queue, JobStore& store, ProcessRegistry& registry,
    const std::function<bool(const std::string&)>& still_running) {
  while (!queue.empty()) {
    const std::string id = std::to_string(*queue.begin());
    std::optional<v1::JobStatus> job = store.get_job(id);
    if (!job || job->state() != v1::QUEUED) {
      queue.erase(queue.begin());
      continue;
    }
    if (still_running(id)) return std::nullopt;  // requeued by its driver, not finished yet
    // Strict FIFO: a job waits until the head of the queue has started.
    std::vector<std::string> workers = registry.idle(v1::WORKER);
    std::vector<std::string> shards = registry.idle(v1::EXPERT_SHARD);
    const size_t w = job->spec().num_workers(), s = job->spec().num_shards();
    if (workers.size() < w || shards.size() < s) return std::nullopt;
    Assignment a;
    a.workers.assign(workers.begin(), workers.begin() + w);
    a.shards.assign(shards.begin(), shards.begin() + s);
    std::vector<std::string> ids = a.workers;
    ids.insert(ids.end(), a.shards.begin(), a.shards.end());
    if (!registry.assign(ids, id)) return std::nullopt;  // one died in between; retry next tick
    a.job = std::move(*job);
    return a;
  }
  return std::nullopt;
}

void Coordinator::Impl::scheduler_loop() {
  using Clock = std::chrono::steady_clock;
  auto next_metrics = Clock::now();
  mu_.Lock();
  while (!stopping_) {
    reap_finished_locked();
    schedule_locked();
    if (Clock::now() >= next_metrics) {
      mu_.Unlock();
      metrics_.set_jobs(store_.list_jobs());
      metrics_.set_processes(registry_.snapshot(), registry_);
      mu_.Lock();
      next_metrics = Clock::now() + std::chrono::seconds(1);
    }
    // Woken by submissions, registrations and finished jobs; the timeout catches processes that
    // became live or dead by the clock alone.
    changed_.WaitWithTimeout(&mu_, absl::Milliseconds(100));
  }
  mu_.Unlock();
}

void Coordinator::Impl::reap_finished_locked() {
  for (auto it = running_.begin(); it != running_.end();) {
    if (it->second->driver->finished()) {
      it->second->thread.join();  // the driver's last act was setting finished
      it = running_.erase(it);
    } else {
      ++it;
    }
  }
}

void Coordinator::Impl::schedule_locked() {
  const auto still_running = [this](const std::string& id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return running_.count(id) > 0;
  };
  while (std::optional<Assignment> a = assign_next(queue_, store_, registry_, still_running)) {
    v1::JobStatus& job = a->job;
    const std::string id = job.job_id();
    std::vector<Member> members;
    std::vector<std::string> ids;
    for (const auto* group : {&a->workers, &a->shards}) {
      const v1::Role role = group == &a->workers ? v1::WORKER : v1::EXPERT_SHARD;
      for (size_t rank = 0; rank < group->size(); ++rank) {
        const std::string& pid = (*group)[rank];
        std::optional<ProcessInfo> p = registry_.get(pid);
        members.push_back(
            make_member(pid, role, static_cast<int>(rank), p ? p->address : "", options_.security));
        ids.push_back(pid);
      }
    }
    job.set_state(v1::STARTING);
    job.clear_process_ids();
    for (const std::string& pid : ids) job.add_process_ids(pid);
    job.set_updated_unix_ms(unix_ms());
    store_.put_job(job);
    queue_.erase(queue_.begin());

    DriverHost host;
    host.mu = &mu_;
    host.changed = &changed_;
    host.requeue = [this](const std::string& job_id) {
      mu_.AssertHeld();  // the driver calls it under host.mu
      queue_.insert(job_number(job_id));
    };
    auto run = std::make_unique<RunningJob>();
    run->driver = std::make_unique<JobDriver>(options_, data_dir_, store_, registry_, metrics_,
                                              std::move(host), id, std::move(members));
    RunningJob* raw = run.get();
    running_[id] = std::move(run);
    raw->thread = std::thread([raw] { raw->driver->run(); });
  }
}

}  // namespace loopmoe::coordinator
