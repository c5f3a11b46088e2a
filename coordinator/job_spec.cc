#include "coordinator/job_spec.h"

#include <toml++/toml.h>

#include <algorithm>
#include <filesystem>
#include <optional>
#include <sstream>
#include <string>

#include "dataloader/dataset_check.h"
#include "model/error.h"
#include "model/rng.h"
#include "model/toml_util.h"

namespace loopmoe::coordinator {
namespace {

// The most loops a schedule may ask for (a job file or a SubmitJob request): far above any model
// we train, low enough that a loop count times the layers never overflows an int.
constexpr int kMaxScheduleLoops = 1024;

[[noreturn]] void fail(const std::string& source, const std::string& what) {
  throw model::ConfigError(source + ": " + what);
}

int64_t next_multiple(int64_t done, int64_t interval) { return (done / interval + 1) * interval; }

std::string absolute_from(const std::string& path, const std::string& base_dir) {
  std::filesystem::path p(path);
  if (p.is_absolute()) return p.lexically_normal().string();
  return (std::filesystem::path(base_dir) / p).lexically_normal().string();
}

}  // namespace

model::Config validate_job_spec(const v1::JobSpec& spec, const std::string& source) {
  model::Config config = model::parse_config(spec.config_toml(), source);
  if (spec.num_workers() < 1) {
    fail(source, "workers = " + std::to_string(spec.num_workers()) + " must be at least 1");
  }
  if (spec.num_shards() < 1 || spec.num_shards() > config.model.n_experts) {
    fail(source, "shards = " + std::to_string(spec.num_shards()) + " must be in [1, " +
                     std::to_string(config.model.n_experts) + "] (model.n_experts)");
  }
  if (spec.threads() < 0) {
    fail(source, "threads = " + std::to_string(spec.threads()) + " must be >= 0");
  }
  if (spec.resume_step() < 0) fail(source, "resume_step must be >= 0");
  const v1::LoopSchedule& s = spec.schedule();
  switch (s.kind()) {
    case v1::LoopSchedule::FIXED:
      break;
    case v1::LoopSchedule::LIST:
      if (s.loops().empty()) fail(source, "schedule kind list needs a non-empty loops list");
      for (int r : s.loops()) {
        if (r < 1) {
          fail(source, "schedule loops entry " + std::to_string(r) + " must be at least 1");
        }
        if (r > kMaxScheduleLoops) {
          fail(source, "schedule loops entry " + std::to_string(r) + " is above " +
                           std::to_string(kMaxScheduleLoops));
        }
      }
      break;
    case v1::LoopSchedule::UNIFORM:
      if (s.min_loops() < 1) {
        fail(source,
             "schedule min_loops = " + std::to_string(s.min_loops()) + " must be at least 1");
      }
      if (s.max_loops() > kMaxScheduleLoops) {
        fail(source, "schedule max_loops = " + std::to_string(s.max_loops()) + " is above " +
                         std::to_string(kMaxScheduleLoops));
      }
      if (s.max_loops() < s.min_loops()) {
        fail(source, "schedule max_loops = " + std::to_string(s.max_loops()) +
                         " is below min_loops = " + std::to_string(s.min_loops()));
      }
      break;
    default:
      fail(source, "unknown schedule kind " + std::to_string(s.kind()));
  }
  return config;
}

void check_job_data(const model::Config& config) {
  dataloader::DatasetNeeds needs;
  needs.max_vocab = static_cast<uint32_t>(config.model.vocab_size);
  needs.seq_len = config.model.seq_len;
  needs.val = true;
  needs.val_why = "every job validates after its last step (train.steps = " +
                  std::to_string(config.train.steps) + ")";
  dataloader::check_dataset(config.data.dir, needs);
}

int loops_for_step(const v1::LoopSchedule& schedule, int n_loops, int64_t step) {
  switch (schedule.kind()) {
    case v1::LoopSchedule::LIST:
      return schedule.loops(static_cast<int>(step % schedule.loops_size()));
    case v1::LoopSchedule::UNIFORM: {
      const uint64_t span = static_cast<uint64_t>(schedule.max_loops()) - schedule.min_loops() + 1;
      // The splitmix64 stream of model/rng.h entered at draw `step`: the state after `step` draws
      // from `seed` is seed + step·0x9E3779B97F4A7C15, and its next output is the documented z.
      const uint64_t z =
          model::Rng(schedule.seed() + static_cast<uint64_t>(step) * 0x9E3779B97F4A7C15ull)
              .next_u64();
      return schedule.min_loops() + static_cast<int>(z % span);
    }
    default:
      return n_loops;
  }
}

int64_t next_chunk_end(const model::TrainConfig& train, int64_t done, int64_t max_chunk) {
  int64_t end = std::min<int64_t>(train.steps, done + max_chunk);
  end = std::min(end, next_multiple(done, train.log_interval));
  if (train.eval_interval > 0) end = std::min(end, next_multiple(done, train.eval_interval));
  if (train.checkpoint_interval > 0) {
    end = std::min(end, next_multiple(done, train.checkpoint_interval));
  }
  return end;
}

bool eval_due(const model::TrainConfig& train, int64_t done) {
  return done == train.steps || (train.eval_interval > 0 && done % train.eval_interval == 0);
}

bool checkpoint_due(const model::TrainConfig& train, int64_t done) {
  return done == train.steps ||
         (train.checkpoint_interval > 0 && done % train.checkpoint_interval == 0);
}

bool log_due(const model::TrainConfig& train, int64_t done) {
  return done == train.steps || done % train.log_interval == 0;
}

v1::JobSpec parse_job_file(const std::string& toml_text, const std::string& source,
                           const std::string& base_dir) {
  toml::table root = model::parse_toml(toml_text, source);
  v1::JobSpec spec;
  spec.set_num_workers(1);
  spec.set_num_shards(1);
  if (const toml::node* job_node = root.get("job")) {
    const toml::table* job = job_node->as_table();
    if (job == nullptr) fail(source, "[job] must be a table");
    auto integer = [&](const char* key, int64_t lo, int64_t hi) -> std::optional<int64_t> {
      const toml::node* n = job->get(key);
      if (n == nullptr) return std::nullopt;
      if (!n->is_integer()) fail(source, std::string("job.") + key + " must be an integer");
      const int64_t x = *n->value<int64_t>();
      if (x < lo || x > hi) {
        fail(source, std::string("job.") + key + " = " + std::to_string(x) + " is out of range [" +
                         std::to_string(lo) + ", " + std::to_string(hi) + "]");
      }
      return x;
    };
    auto string = [&](const char* key) -> std::optional<std::string> {
      const toml::node* n = job->get(key);
      if (n == nullptr) return std::nullopt;
      if (!n->is_string()) fail(source, std::string("job.") + key + " must be a string");
      return *n->value<std::string>();
    };
    for (auto&& [key, value] : *job) {
      static const char* kKnown[] = {"name",       "workers",     "shards",   "threads",
                                     "output_dir", "resume_step", "schedule", "resume_from_job"};
      const std::string k(key.str());
      if (std::find(std::begin(kKnown), std::end(kKnown), k) == std::end(kKnown)) {
        fail(source, "unknown key job." + k);
      }
      (void)value;
    }
    if (auto v = string("name")) spec.set_name(*v);
    if (auto v = integer("workers", 1, 1 << 20)) spec.set_num_workers(static_cast<int>(*v));
    if (auto v = integer("shards", 1, 1 << 20)) spec.set_num_shards(static_cast<int>(*v));
    if (auto v = integer("threads", 0, 4096)) spec.set_threads(static_cast<int>(*v));
    if (auto v = string("output_dir")) spec.set_output_dir(absolute_from(*v, base_dir));
    if (auto v = integer("resume_step", 0, int64_t{1} << 40)) spec.set_resume_step(*v);
    if (auto v = string("resume_from_job")) spec.set_resume_from_job(*v);
    if (const toml::node* sched_node = job->get("schedule")) {
      const toml::table* sched = sched_node->as_table();
      if (sched == nullptr) fail(source, "[job.schedule] must be a table");
      v1::LoopSchedule* s = spec.mutable_schedule();
      for (auto&& [key, value] : *sched) {
        static const char* kKnown[] = {"kind", "loops", "min_loops", "max_loops", "seed"};
        const std::string k(key.str());
        if (std::find(std::begin(kKnown), std::end(kKnown), k) == std::end(kKnown)) {
          fail(source, "unknown key job.schedule." + k);
        }
        if (k == "kind") {
          const std::string kind = value.value_or(std::string());
          if (kind == "fixed") {
            s->set_kind(v1::LoopSchedule::FIXED);
          } else if (kind == "list") {
            s->set_kind(v1::LoopSchedule::LIST);
          } else if (kind == "uniform") {
            s->set_kind(v1::LoopSchedule::UNIFORM);
          } else {
            fail(source, "job.schedule.kind = '" + kind +
                             "' is not one of \"fixed\", \"list\", \"uniform\"");
          }
        } else if (k == "loops") {
          const toml::array* arr = value.as_array();
          if (arr == nullptr) fail(source, "job.schedule.loops must be an array of integers");
          for (const toml::node& e : *arr) {
            if (!e.is_integer()) fail(source, "job.schedule.loops must be an array of integers");
            const int64_t r = *e.value<int64_t>();
            if (r < 0 || r > kMaxScheduleLoops) fail(source, "job.schedule.loops is out of range");
            s->add_loops(static_cast<int32_t>(r));
          }
        } else {
          if (!value.is_integer()) fail(source, "job.schedule." + k + " must be an integer");
          const int64_t x = *value.value<int64_t>();
          if (k == "seed") {
            s->set_seed(static_cast<uint64_t>(x));
          } else {
            if (x < 0 || x > kMaxScheduleLoops) {
              fail(source, "job.schedule." + k + " is out of range");
            }
            (k == "min_loops" ? s->set_min_loops(static_cast<int32_t>(x))
                              : s->set_max_loops(static_cast<int32_t>(x)));
          }
        }
      }
    }
    root.erase("job");
  }
  // The training config as written minus [job] (not the canonical text, so a coordinator built
  // from another version accepts what it knows); processes run elsewhere, so data.dir (explicit or
  // default) becomes absolute.
  std::ostringstream os;
  os << root;
  const model::Config config = model::parse_config(os.str(), source);
  if (root.get("data") == nullptr) root.insert("data", toml::table{});
  root["data"].as_table()->insert_or_assign("dir", absolute_from(config.data.dir, base_dir));
  std::ostringstream out;
  out << root << "\n";
  spec.set_config_toml(out.str());
  return spec;
}

const char* job_state_name(v1::JobState state) {
  switch (state) {
    case v1::QUEUED:
      return "queued";
    case v1::STARTING:
      return "starting";
    case v1::RUNNING:
      return "running";
    case v1::SUCCEEDED:
      return "succeeded";
    case v1::FAILED:
      return "failed";
    case v1::CANCELLED:
      return "cancelled";
    default:
      return "unspecified";
  }
}

bool is_terminal(v1::JobState state) {
  return state == v1::SUCCEEDED || state == v1::FAILED || state == v1::CANCELLED;
}

}  // namespace loopmoe::coordinator
