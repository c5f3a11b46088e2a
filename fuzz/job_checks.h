// What the coordinator does with a job spec once validate_job_spec has accepted it, short of any
// side effect (coordinator/rpc_handlers.cc SubmitJob, coordinator/job_driver.cc): the canonical
// config and its hash, then the step chunks and the loop count of each step. Shared by
// job_spec_fuzzer and submit_job_fuzzer; a broken invariant is a finding (fuzz::fail).
#pragma once

#include <xxhash.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "coordinator/job_spec.h"
#include "fuzz/fuzz_util.h"
#include "model/config.h"
#include "proto/loopmoe.pb.h"

namespace loopmoe::fuzz {

inline void check_accepted_job(const v1::JobSpec& spec, const model::Config& config) {
  const std::string canonical = model::to_toml(config);
  (void)XXH64(canonical.data(), canonical.size(), 0);
  const model::TrainConfig& train = config.train;
  const v1::LoopSchedule& schedule = spec.schedule();
  // The driver's loop: chunks of steps from 0 (or a resume step) to train.steps. Bounded here; a
  // long job repeats the same arithmetic.
  int64_t done = std::min<int64_t>(spec.resume_step(), train.steps);
  for (int chunk = 0; chunk < 64 && done < train.steps; ++chunk) {
    const int64_t end = coordinator::next_chunk_end(train, done);
    check(end > done && end <= train.steps && end - done <= 50,
          "next_chunk_end(" + std::to_string(done) + ") = " + std::to_string(end) +
              " is not a chunk within " + std::to_string(train.steps) + " steps");
    for (int64_t s = done; s < end; ++s) {
      const int loops = coordinator::loops_for_step(schedule, config.model.n_loops, s);
      check(loops >= 1, "loops_for_step(" + std::to_string(s) + ") = " + std::to_string(loops));
      if (schedule.kind() == v1::LoopSchedule::UNIFORM) {
        check(loops >= schedule.min_loops() && loops <= schedule.max_loops(),
              "a uniform schedule's loop count " + std::to_string(loops) + " is out of range");
      }
    }
    (void)coordinator::eval_due(train, end);
    (void)coordinator::checkpoint_due(train, end);
    check(end != train.steps || coordinator::log_due(train, end), "the last step is not logged");
    done = end;
  }
  // A restart far into a long job: the same functions at a large step.
  const int64_t far = int64_t{1} << 40;
  (void)coordinator::loops_for_step(schedule, config.model.n_loops, far);
}

}  // namespace loopmoe::fuzz
