// The job driver (job_driver.h): one run of one job on its assigned training processes: how the
// run ends (run()) and its step loop (drive_run()). The calls to the members are in
// job_driver_calls.cc.
#include "coordinator/job_driver.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "common/loss_spike.h"
#include "coordinator/job_driver_internal.h"
#include "coordinator/job_spec.h"
#include "coordinator/output_dir.h"
#include "coordinator/util.h"
#include "model/error.h"

namespace loopmoe::coordinator {
namespace {

using common::kMaxRollbacks;
using internal::format;
using internal::unix_ms;

// RUN/metrics.jsonl in the output directory, in `loopmoe train`'s format (so `loopmoe compare`
// reads a cluster run like a local one) with full precision. A run resumed from step `keep`
// first drops the records after it, so the file always describes one consistent run.
void truncate_metrics_after(const std::filesystem::path& path, int64_t keep) {
  std::ifstream in(path);
  if (!in) return;
  std::string line, kept;
  while (std::getline(in, line)) {
    const auto pos = line.find("\"step\": ");
    if (pos != std::string::npos && std::stoll(line.substr(pos + 8)) <= keep) kept += line + "\n";
  }
  in.close();
  std::ofstream(path, std::ios::trunc) << kept;
}

std::string step_record(const loopmoe::v1::StepReport& r, double tokens_per_s) {
  char buf[512];
  std::snprintf(buf, sizeof(buf),
                "{\"step\": %lld, \"loss\": %.17g, \"ce\": %.17g, \"aux\": %.17g, \"z\": "
                "%.17g, \"dropped\": %lld, \"lr\": %.17g, \"grad_norm\": %.17g, \"loops\": %d, "
                "\"tokens_per_s\": %.6g}\n",
                static_cast<long long>(r.step()), r.loss(), r.ce(), r.aux(), r.z(),
                static_cast<long long>(r.dropped()), r.lr(), r.grad_norm(), r.loops(),
                tokens_per_s);
  return buf;
}

}  // namespace

using internal::Cancelled;
using internal::PermanentFailure;
using internal::RunFailure;
using internal::Stopping;

JobDriver::JobDriver(const CoordinatorOptions& options, std::string data_dir, JobStore& store,
                     ProcessRegistry& registry, CoordinatorMetrics& metrics, DriverHost host,
                     std::string job_id, std::vector<Member> members)
    : options_(options),
      data_dir_(std::move(data_dir)),
      store_(store),
      registry_(registry),
      metrics_(metrics),
      host_(std::move(host)),
      job_id_(std::move(job_id)),
      members_(std::move(members)) {}

bool JobDriver::update_job(const std::function<bool(v1::JobStatus&)>& change) {
  {
    absl::MutexLock lock(host_.mu);
    std::optional<v1::JobStatus> job = store_.get_job(job_id_);
    if (!job || !change(*job)) return false;
    job->set_updated_unix_ms(unix_ms());
    store_.put_job(*job);
  }
  host_.changed->SignalAll();
  return true;
}

void JobDriver::log(const std::string& text) {
  store_.append_log(job_id_, text, unix_ms());
  host_.changed->SignalAll();
}

void JobDriver::run() {
  const std::string id = job_id_;
  std::set<std::string> dead;
  try {
    drive_run();
  } catch (const Stopping&) {
    // Coordinator shutdown: the job stays STARTING/RUNNING and is requeued at the next start.
    shutdown_members({});
  } catch (const Cancelled&) {
    shutdown_members({});
    std::optional<v1::JobStatus> job = store_.get_job(id);
    log("cancelled at step " + std::to_string(job ? job->step() : 0));
  } catch (const PermanentFailure& e) {
    log(std::string("error: ") + e.what());
    shutdown_members({});
    update_job([&](v1::JobStatus& job) {
      if (is_terminal(job.state())) return false;
      job.set_state(v1::FAILED);
      job.set_error(e.what());
      return true;
    });
    log("failed");
  } catch (const RunFailure& e) {
    log(std::string("error: ") + e.what());
    dead.insert(e.unreachable.begin(), e.unreachable.end());
    for (const std::string& pid : dead) registry_.remove(pid);
    shutdown_members(dead);
    bool requeued = false;
    int64_t epoch = 0;
    // Out of restarts: say so before the state turns FAILED, so that whoever sees FAILED (a
    // `logs --follow` ends there) has the line too.
    if (const std::optional<v1::JobStatus> before = store_.get_job(id);
        before && !is_terminal(before->state()) && before->epoch() >= options_.max_restarts) {
      log("failed: out of restarts (--max-restarts " + std::to_string(options_.max_restarts) + ")");
    }
    update_job([&](v1::JobStatus& job) {
      if (is_terminal(job.state())) return false;  // cancelled meanwhile
      if (job.epoch() >= options_.max_restarts) {
        job.set_state(v1::FAILED);
        job.set_error(std::string(e.what()) + " (after " + std::to_string(job.epoch()) +
                      " restart(s))");
      } else {
        job.set_state(v1::QUEUED);
        job.set_epoch(job.epoch() + 1);
        job.clear_process_ids();
        requeued = true;
        epoch = job.epoch();
      }
      return true;
    });
    if (requeued) {
      {
        absl::MutexLock lock(host_.mu);
        host_.requeue(id);  // scheduled again once this driver has finished
      }
      log("restarting as epoch " + std::to_string(epoch) + " from its latest checkpoint");
    }
  } catch (const std::exception& e) {
    // Store errors and the like: the coordinator itself is in trouble; say so and fail the job.
    std::fprintf(stderr, "coordinator: job %s: internal error: %s\n", id.c_str(), e.what());
    shutdown_members({});
    try {
      update_job([&](v1::JobStatus& job) {
        if (is_terminal(job.state())) return false;
        job.set_state(v1::FAILED);
        job.set_error(std::string("coordinator internal error: ") + e.what());
        return true;
      });
    } catch (const std::exception&) {
      // The store itself failed; the job is requeued when the coordinator restarts.
    }
  }
  std::vector<std::string> ids;
  for (const Member& m : members_) ids.push_back(m.id);
  registry_.release(ids, id);
  {
    absl::MutexLock lock(host_.mu);
    finished_ = true;
  }
  host_.changed->SignalAll();
}

v1::CheckpointMeta JobDriver::resume_point(const v1::JobSpec& spec, bool* other_job) {
  v1::CheckpointMeta resume;
  std::vector<v1::CheckpointMeta> checkpoints = store_.list_checkpoints(job_id_);
  const bool from_other = checkpoints.empty() && !spec.resume_from_job().empty();
  *other_job = from_other;
  if (from_other) checkpoints = store_.list_checkpoints(spec.resume_from_job());
  const bool own_latest = !from_other && !spec.resume_from_job().empty();
  if (!checkpoints.empty()) {
    if (spec.resume_step() == 0 || own_latest) {
      resume = checkpoints.back();
    } else {
      auto it =
          std::find_if(checkpoints.begin(), checkpoints.end(),
                       [&](const v1::CheckpointMeta& m) { return m.step() == spec.resume_step(); });
      if (it == checkpoints.end()) {
        std::string have;
        for (const auto& m : checkpoints)
          have += (have.empty() ? "" : ", ") + std::to_string(m.step());
        throw PermanentFailure("no committed checkpoint at resume_step " +
                               std::to_string(spec.resume_step()) + " (committed steps: " + have +
                               ")");
      }
      resume = *it;
    }
  }
  return resume;
}

void JobDriver::roll_back(int64_t step, const std::string& what, int total_steps) {
  // Recorded in the job, so that every later run drops the step, after a coordinator restart too.
  int rollbacks = 0;
  update_job([&](v1::JobStatus& j) {
    if (is_terminal(j.state())) return false;
    if (std::find(j.rollback_steps().begin(), j.rollback_steps().end(), step) ==
        j.rollback_steps().end()) {
      j.add_rollback_steps(step);
    }
    rollbacks = j.rollback_steps_size();
    return true;
  });
  if (rollbacks > kMaxRollbacks) {
    throw PermanentFailure(
        what + format(" after %d rollbacks (train.nonfinite = \"rollback\")", kMaxRollbacks));
  }
  log(
      format("warning: step %lld/%d: non-finite loss or gradient norm; rolling back to the last "
             "checkpoint (rollback %d; the replay drops the step)",
             (long long)step + 1, total_steps, rollbacks));
  throw RunFailure(what, {});
}

void JobDriver::drive_run() {
  const std::string id = job_id_;
  std::optional<v1::JobStatus> job = store_.get_job(id);
  if (!job) throw PermanentFailure("job record disappeared");
  const v1::JobSpec& spec = job->spec();
  model::Config config;
  try {
    config = model::parse_config(spec.config_toml(), "job " + id);
  } catch (const model::ConfigError& e) {
    throw PermanentFailure(e.what());
  }
  const model::TrainConfig& train = config.train;
  std::string output_dir = data_dir_ + "/jobs/" + id;
  if (!spec.output_dir().empty()) {
    // Checked again: a symlink made under the data root since SubmitJob must not lead out of it.
    try {
      output_dir = confine_output_dir(
          spec.output_dir(), options_.data_root.empty() ? data_dir_ + "/jobs" : options_.data_root);
    } catch (const std::invalid_argument& e) {
      throw PermanentFailure(std::string("output_dir: ") + e.what());
    }
  }
  const int64_t epoch = job->epoch();

  bool from_other = false;
  const v1::CheckpointMeta resume = resume_point(spec, &from_other);
  std::string who;
  for (const Member& m : members_) who += (who.empty() ? "" : ", ") + m.label();
  log(format("epoch %lld: starting on ", (long long)epoch) + who +
      (resume.step() > 0 ? format(", resuming from step %lld", (long long)resume.step()) +
                               (from_other ? " of job " + spec.resume_from_job() : "")
                         : std::string(", from step 0")));

  const std::string prefix = "job/" + id + "/epoch/" + std::to_string(epoch) + "/";
  call_all("Configure", options_.configure_timeout, [&](Member& m, grpc::ClientContext* c) {
    v1::ConfigureRequest request;
    request.set_job_id(id);
    request.set_epoch(epoch);
    request.set_role(m.role);
    request.set_rank(m.rank);
    request.set_num_workers(spec.num_workers());
    request.set_num_shards(spec.num_shards());
    request.set_config_toml(spec.config_toml());
    request.set_threads(std::max(1, spec.threads()));
    request.set_rendezvous_prefix(prefix);
    request.set_output_dir(output_dir);
    if (resume.step() > 0) *request.mutable_resume() = resume;
    v1::ConfigureResponse response;
    return m.stub->Configure(c, request, &response);
  });
  check_interrupts();
  update_job([&](v1::JobStatus& j) {
    if (is_terminal(j.state())) return false;
    j.set_state(v1::RUNNING);
    j.set_step(resume.step());
    return true;
  });

  const std::filesystem::path metrics_path = std::filesystem::path(output_dir) / "metrics.jsonl";
  std::error_code ignored;
  std::filesystem::create_directories(output_dir, ignored);
  truncate_metrics_after(metrics_path, resume.step());
  std::ofstream(std::filesystem::path(output_dir) / "config.toml", std::ios::trunc)
      << spec.config_toml();
  std::ofstream metrics_file(metrics_path, std::ios::app);
  if (!metrics_file) log("warning: cannot write " + metrics_path.string());
  // The loss-spike check (train.loss_spike_*) sees the losses of this run: after a restart its
  // window refills from the resume point, as `loopmoe train`'s does after a rollback.
  common::LossSpikeCheck spikes(train.loss_spike_factor, train.loss_spike_window);
  int64_t done = resume.step();
  int64_t skipped = 0;  // steps skipped or dropped in this run, as `loopmoe train` counts them
  while (done < train.steps) {
    check_interrupts();
    const int64_t end = next_chunk_end(train, done, options_.max_chunk_steps);
    std::vector<int32_t> loops;
    for (int64_t s = done; s < end; ++s) {
      loops.push_back(loops_for_step(spec.schedule(), config.model.n_loops, s));
    }
    std::vector<v1::RunStepsResponse> responses(members_.size());
    try {
      call_all("RunSteps", options_.step_timeout, [&](Member& m, grpc::ClientContext* c) {
        v1::RunStepsRequest request;
        request.set_job_id(id);
        request.set_first_step(done);
        request.mutable_loops()->Add(loops.begin(), loops.end());
        for (int64_t s : job->rollback_steps()) {
          if (s >= done && s < end) request.add_drop_steps(s);
        }
        return m.stub->RunSteps(c, request, &responses[&m - members_.data()]);
      });
    } catch (const RunFailure& e) {
      // The numerics guard's "stop" (runtime::PolicyStop, answered ABORTED) fails the job; its
      // "rollback" restarts it from the last checkpoint, the replay dropping the failed step.
      if (e.rollback_step) roll_back(*e.rollback_step, e.what(), train.steps);
      if (e.policy_stop) throw PermanentFailure(e.what());
      throw;
    }
    for (size_t i = 0; i < responses.size(); ++i) {
      if (responses[i].steps_size() != static_cast<int>(loops.size())) {
        throw RunFailure(
            format("RunSteps on %s returned %d step report(s) for %zu step(s)",
                   members_[i].label().c_str(), responses[i].steps_size(), loops.size()),
            {});
      }
    }
    const v1::RunStepsResponse& lead = responses[0];  // worker 0 carries the loss
    double chunk_seconds = 0;
    int64_t chunk_tokens = 0;
    for (int k = 0; k < lead.steps_size(); ++k) {
      const v1::StepReport& r = lead.steps(k);
      chunk_seconds += r.seconds();
      chunk_tokens += r.tokens();
      if (r.skipped()) {
        // The single-process trainer's record of a skipped step (no loss: it may be NaN, which
        // JSON cannot hold).
        ++skipped;
        metrics_file << format(
            "{\"step\": %lld, \"skipped_step\": true, \"lr\": %.17g, "
            "\"skipped\": %lld}\n",
            (long long)r.step(), r.lr(), (long long)skipped);
        const bool dropped = std::find(job->rollback_steps().begin(), job->rollback_steps().end(),
                                       r.step() - 1) != job->rollback_steps().end();
        log(dropped
                ? format("step %lld/%d dropped on the replay after a rollback", (long long)r.step(),
                         train.steps)
                : format("step %lld/%d skipped: non-finite loss or gradient norm (grad_norm %g)",
                         (long long)r.step(), train.steps, r.grad_norm()));
        continue;
      } else if (const std::optional<double> med = spikes.observe(r.loss())) {
        const std::string text =
            format("loss spike at step %lld: %.6g > %g x the running median %.6g",
                   (long long)r.step(), r.loss(), train.loss_spike_factor, *med);
        if (train.loss_spike_action == "stop") {
          const std::optional<v1::JobStatus> now = store_.get_job(id);
          const int64_t last = now ? now->last_checkpoint_step() : 0;
          throw PermanentFailure(text + " (train.loss_spike_action = \"stop\"); last checkpoint: " +
                                 (last > 0 ? format("step %lld", (long long)last) : "none"));
        }
        metrics_.count_loss_spike(id);
        log("warning: " + text);
      }
      if (!log_due(train, r.step())) continue;
      int64_t a2a_bytes = 0;
      double a2a_seconds = 0;
      for (const v1::RunStepsResponse& resp : responses) {
        a2a_bytes += resp.steps(k).alltoall_bytes();
        a2a_seconds = std::max(a2a_seconds, resp.steps(k).alltoall_seconds());
      }
      const double tok_s = r.seconds() > 0 ? r.tokens() / r.seconds() : 0;
      metrics_file << step_record(r, tok_s);
      log(
          format("step %lld/%d loss %.4f lr %.1e grad_norm %.2f loops %d dropped %lld "
                 "tok/s %.0f a2a %.1f MB %.1f ms",
                 (long long)r.step(), train.steps, r.loss(), r.lr(), r.grad_norm(), r.loops(),
                 (long long)r.dropped(), tok_s, a2a_bytes / 1e6, a2a_seconds * 1e3));
    }
    metrics_file.flush();
    done = end;
    const double loss = lead.steps(lead.steps_size() - 1).loss();
    update_job([&](v1::JobStatus& j) {
      if (is_terminal(j.state())) return false;
      j.set_step(done);
      j.set_loss(loss);
      j.set_tokens_per_s(chunk_seconds > 0 ? chunk_tokens / chunk_seconds : 0);
      return true;
    });
    metrics_.set_job_progress(id, done, loss);

    if (eval_due(train, done)) {
      std::vector<v1::EvaluateResponse> evals(members_.size());
      call_all("Evaluate", options_.step_timeout, [&](Member& m, grpc::ClientContext* c) {
        v1::EvaluateRequest request;
        request.set_job_id(id);
        request.set_batches(train.eval_batches);
        return m.stub->Evaluate(c, request, &evals[&m - members_.data()]);
      });
      const double val_loss = evals[0].val_loss();
      log(format("step %lld/%d val_loss %.4f", (long long)done, train.steps, val_loss));
      metrics_file << format("{\"step\": %lld, \"val_loss\": %.17g}\n", (long long)done, val_loss);
      metrics_file.flush();
      update_job([&](v1::JobStatus& j) {
        if (is_terminal(j.state())) return false;
        j.set_val_loss(val_loss);
        return true;
      });
    }
    if (checkpoint_due(train, done)) {
      v1::CheckpointMeta meta = checkpoint(*job, output_dir, done);
      update_job([&](v1::JobStatus& j) {
        j.set_last_checkpoint_step(done);  // committed: recorded even if cancelled meanwhile
        return true;
      });
      log(format("checkpoint step %lld committed (%d files)", (long long)done, meta.files_size()));
    }
  }
  if (cancel_) throw Cancelled{};
  shutdown_members({});
  if (update_job([&](v1::JobStatus& j) {
        if (is_terminal(j.state())) return false;
        j.set_state(v1::SUCCEEDED);
        return true;
      })) {
    log(format("succeeded after %lld steps", (long long)done));
  }
}

}  // namespace loopmoe::coordinator
