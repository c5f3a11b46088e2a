// The Coordinator's SubmitJob request as it arrives (proto bytes of loopmoe.v1.SubmitJobRequest):
// what coordinator/rpc_handlers.cc does with it before its first side effect (validate_job_spec:
// the spec's fields and its config_toml), then, for an accepted spec, the job driver's step and
// loop arithmetic (job_checks.h). The dataset check (check_job_data) is token_shard_fuzzer's;
// the job store and the queue are not fuzzed.
#include <cstddef>
#include <cstdint>

#include "coordinator/job_spec.h"
#include "fuzz/fuzz_util.h"
#include "fuzz/job_checks.h"
#include "model/config.h"
#include "model/error.h"
#include "proto/loopmoe.pb.h"

namespace loopmoe::fuzz {
namespace {

void fuzz_submit(const uint8_t* data, size_t size) {
  v1::SubmitJobRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return;
  model::Config config;
  try {
    config = coordinator::validate_job_spec(request.spec(), "job spec");
  } catch (const model::ConfigError&) {
    return;
  }
  const v1::JobSpec& spec = request.spec();
  check(spec.num_workers() >= 1 && spec.num_shards() >= 1 &&
            spec.num_shards() <= config.model.n_experts && spec.threads() >= 0 &&
            spec.resume_step() >= 0,
        "validate_job_spec accepted out-of-range spec fields", spec.ShortDebugString());
  check_accepted_job(spec, config);
}

}  // namespace
}  // namespace loopmoe::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  loopmoe::fuzz::fuzz_submit(data, size);
  return 0;
}
