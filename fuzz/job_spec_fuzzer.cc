// Job file TOML (`loopmoe submit JOB.toml`: coordinator/job_spec.cc parse_job_file, then
// validate_job_spec as the coordinator runs it on the spec). A text is refused with a ConfigError
// or becomes a spec whose config_toml parses again with absolute data.dir and output_dir; an
// accepted spec then goes through the coordinator's step and loop arithmetic (job_checks.h).
#include <cstddef>
#include <cstdint>
#include <string>

#include "coordinator/job_spec.h"
#include "fuzz/fuzz_util.h"
#include "fuzz/job_checks.h"
#include "model/config.h"
#include "model/error.h"

namespace loopmoe::fuzz {
namespace {

void fuzz_job_file(std::string_view input) {
  const std::string text(input);
  v1::JobSpec spec;
  try {
    spec = coordinator::parse_job_file(text, "job.toml", "/fuzz/base");
  } catch (const model::ConfigError&) {
    return;
  }
  model::Config config;
  try {
    config = model::parse_config(spec.config_toml(), "spec.config_toml");
  } catch (const model::ConfigError& e) {
    fail(std::string("parse_job_file returned a config_toml that does not parse: ") + e.what(),
         spec.config_toml());
  }
  check(!config.data.dir.empty() && config.data.dir.front() == '/',
        "data.dir of a parsed job file is not absolute: " + config.data.dir);
  check(spec.output_dir().empty() || spec.output_dir().front() == '/',
        "output_dir of a parsed job file is not absolute: " + spec.output_dir());
  try {
    config = coordinator::validate_job_spec(spec, "job spec");
  } catch (const model::ConfigError&) {
    return;
  }
  check_accepted_job(spec, config);
}

}  // namespace
}  // namespace loopmoe::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  loopmoe::fuzz::fuzz_job_file(loopmoe::fuzz::as_text(data, size));
  return 0;
}
