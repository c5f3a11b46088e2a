#include "runtime/runtime_base.h"

#include <cmath>
#include <filesystem>
#include <limits>
#include <stdexcept>

#include "model/error.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "runtime/process_checkpoint.h"

namespace loopmoe::runtime {

namespace fs = std::filesystem;

model::Config checked_config(const ProcessSetup& setup, Role role) {
  if (setup.store == nullptr) throw std::invalid_argument("create_runtime: no rendezvous store");
  if (setup.role != role) {
    throw std::invalid_argument(std::string("create_runtime: a ") + to_string(role) +
                                " runtime cannot host a " + to_string(setup.role));
  }
  if (setup.num_workers < 1 || setup.num_shards < 1) {
    throw model::ConfigError("a job needs at least one worker and one expert shard");
  }
  const int role_size = setup.role == Role::kWorker ? setup.num_workers : setup.num_shards;
  if (setup.rank < 0 || setup.rank >= role_size) {
    throw model::ConfigError(std::string(to_string(setup.role)) + " rank " +
                             std::to_string(setup.rank) + " is outside 0.." +
                             std::to_string(role_size - 1));
  }
  model::Config config = model::parse_config(setup.config_toml, "job " + setup.job_id);
  if (setup.num_shards > config.model.n_experts) {
    throw model::ConfigError("job has " + std::to_string(setup.num_shards) +
                             " expert shards but only " + std::to_string(config.model.n_experts) +
                             " experts per layer");
  }
  return config;
}

std::string checkpoint_file_name(Role role, int rank) {
  return std::string(role == Role::kWorker ? "worker-" : "shard-") + std::to_string(rank) + ".bin";
}

comm::GlooOptions gloo_options(const ProcessSetup& s, const char* group) {
  comm::GlooOptions o;
  o.hostname = s.hostname;
  o.timeout = s.collective_timeout;
  o.rendezvous_timeout = s.rendezvous_timeout;
  o.group = group;
  return o;
}

double sum_of_squares(const float* g, size_t n) {
  const double norm = model::global_norm(g, n);
  return norm * norm;
}

RuntimeBase::RuntimeBase(const ProcessSetup& setup, model::Config config)
    : setup_(setup),
      config_(std::move(config)),
      config_hash_(config_hash(model::to_toml(config_))),
      partition_(config_.model.n_experts, setup.num_shards) {
  apply_process_settings();
}

void RuntimeBase::apply_process_settings() const {
  model::set_num_threads(setup_.threads);
  model::ops::set_matmul_precision(model::ops::parse_matmul_precision(config_.train.precision));
}

void RuntimeBase::connect_world() {
  world_ = comm::make_gloo_communicator(*setup_.store, world_rank(),
                                        setup_.num_workers + setup_.num_shards,
                                        gloo_options(setup_, "world"));
}

std::pair<double, float> RuntimeBase::global_clip(double local_sum_of_squares) {
  double total = local_sum_of_squares;
  world_->allreduce_sum(&total, 1);
  const double norm = std::sqrt(total);
  float coef = 1.f;
  const double max_norm = config_.train.grad_clip;
  if (max_norm > 0) {
    const double c = max_norm / (norm + 1e-6);
    if (c < 1.0) coef = static_cast<float>(c);
  }
  return {norm, coef};
}

bool RuntimeBase::skip_nonfinite_step(double norm) {
  if (std::isfinite(norm)) return false;
  const std::string what = "step " + std::to_string(steps_done_ + 1) +
                           ": the gradient norm or a worker's loss is " + std::to_string(norm);
  if (config_.train.nonfinite == "rollback") {
    throw PolicyRollback(what + " (train.nonfinite = \"rollback\": parameters left as before the " +
                             "step; the job goes back to its last checkpoint)",
                         steps_done_);
  }
  if (config_.train.nonfinite != "skip") {
    throw PolicyStop(what + " (train.nonfinite = \"" + config_.train.nonfinite +
                     "\": parameters left as before the step)");
  }
  return true;
}

StepReport RuntimeBase::drop_step(int loops) {
  apply_process_settings();
  const auto t0 = Clock::now();
  discard_batch();
  const double lr = model::learning_rate(config_.train, static_cast<int>(steps_done_));
  ++steps_done_;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  StepReport r = report(loops, lr, nan, AllToAllStats{}, t0);
  if (setup_.role == Role::kWorker) r.loss = r.ce = nan;
  r.skipped = true;
  return r;
}

StepReport RuntimeBase::report(int loops, double lr, double grad_norm, const AllToAllStats& a2a,
                               Clock::time_point t0) const {
  StepReport r;
  r.step = steps_done_;
  r.loops = loops;
  r.lr = lr;
  r.grad_norm = grad_norm;
  r.num_experts = config_.model.n_experts;
  r.tokens = static_cast<int64_t>(config_.train.batch_size) * config_.model.seq_len;
  r.alltoall_bytes = a2a.bytes_sent;
  r.alltoall_seconds = a2a.seconds;
  r.seconds = common::seconds_since(t0);
  return r;
}

void RuntimeBase::check_resume_file(uint64_t hash, int64_t step, int64_t want_step,
                                    const std::string& path) const {
  if (hash != config_hash_) {
    throw model::CheckpointError(path + ": written for a different config than this job's");
  }
  if (step != want_step) {
    throw model::CheckpointError(path + ": is step " + std::to_string(step) +
                                 ", the checkpoint metadata says " + std::to_string(want_step));
  }
}

std::string RuntimeBase::checkpoint_path(const std::string& dir) const {
  return fs::absolute(fs::path(dir) / checkpoint_file_name(setup_.role, setup_.rank)).string();
}

}  // namespace loopmoe::runtime
