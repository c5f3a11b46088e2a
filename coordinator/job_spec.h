// Job specs of the training service: validation (shared by `loopmoe submit` and the coordinator),
// the loop-count schedule and the step chunks the coordinator drives a job in (docs/SERVICE.md).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"
#include "proto/loopmoe.pb.h"

namespace loopmoe::coordinator {

// Parses spec.config_toml (parse_config, source name `source`) and checks the spec's own fields:
// workers >= 1, 1 <= shards <= model.n_experts, threads >= 0, and the loop schedule. Returns the
// parsed config; throws ConfigError with one clear message otherwise.
model::Config validate_job_spec(const v1::JobSpec& spec, const std::string& source);

// Checks the dataset a job will read, before it is queued: data.dir/train.bin and val.bin exist
// and are token shards (headers only, so it answers at once for any size), their vocabulary is
// at most model.vocab_size, and each holds one window of model.seq_len + 1 tokens. val.bin is
// always needed: every worker opens it, and every job validates after its last step. Throws
// dataloader::DataError whose message starts with the offending file. The coordinator calls it in
// SubmitJob (it sees the data at the workers' paths; CoordinatorOptions::check_data).
void check_job_data(const model::Config& config);

// The loop count of 0-based step `step`: FIXED → n_loops; LIST → loops[step % size];
// UNIFORM → min + splitmix64(seed + (step + 1)·0x9E3779B97F4A7C15) mod (max - min + 1)
// (the first output of splitmix64 started at seed + step·γ; deterministic on every build).
int loops_for_step(const v1::LoopSchedule& schedule, int n_loops, int64_t step);

// The step (exclusive end) of the next chunk starting at `done` steps completed: the nearest of
// the next multiple of log_interval, eval_interval (> 0), checkpoint_interval (> 0), the end of
// training and done + max_chunk.
int64_t next_chunk_end(const model::TrainConfig& train, int64_t done, int64_t max_chunk = 50);
// Whether validation / a checkpoint is due after `done` steps (interval multiples, and the end).
bool eval_due(const model::TrainConfig& train, int64_t done);
bool checkpoint_due(const model::TrainConfig& train, int64_t done);
bool log_due(const model::TrainConfig& train, int64_t done);

// A JOB.toml of `loopmoe submit`: a training config plus an optional [job] table (name, workers,
// shards, threads, output_dir, resume_step, [job.schedule] kind/loops/min_loops/max_loops/seed).
// The [job] table is removed from config_toml; data.dir and output_dir are made absolute relative
// to `base_dir`. Throws ConfigError naming `source` and the key.
v1::JobSpec parse_job_file(const std::string& toml_text, const std::string& source,
                           const std::string& base_dir);

const char* job_state_name(v1::JobState state);  // "queued", "running", ...
bool is_terminal(v1::JobState state);

}  // namespace loopmoe::coordinator
