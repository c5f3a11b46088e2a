// Training config TOML (model/config.cc: parse_config, the reader of every config file, of the
// config a job spec carries and of the config stored in a checkpoint). A text is either refused
// with a ConfigError or accepted; an accepted config must pass validate(), and its canonical text
// (to_toml: what checkpoints store and hash) must parse back to the same config. Anything else
// (another exception, a sanitizer report) is a finding.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz/fuzz_util.h"
#include "model/config.h"
#include "model/error.h"

namespace loopmoe::fuzz {
namespace {

void fuzz_config(std::string_view input) {
  const std::string text(input);
  model::Config config;
  try {
    config = model::parse_config(text, "fuzz.toml");
  } catch (const model::ConfigError&) {
    return;
  }
  try {
    model::validate(config);
  } catch (const model::ConfigError& e) {
    fail(std::string("parse_config accepted a config that validate() refuses: ") + e.what(), text);
  }
  const std::string canonical = model::to_toml(config);
  model::Config again;
  try {
    again = model::parse_config(canonical, "canonical.toml");
  } catch (const model::ConfigError& e) {
    fail(std::string("the canonical text of an accepted config does not parse: ") + e.what(),
         canonical);
  }
  check(model::to_toml(again) == canonical,
        "the canonical text of an accepted config parses to another config", canonical);
  check(!model::model_to_json(config.model).empty() && !model::train_to_json(config.train).empty(),
        "empty JSON for an accepted config");
}

}  // namespace
}  // namespace loopmoe::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  loopmoe::fuzz::fuzz_config(loopmoe::fuzz::as_text(data, size));
  return 0;
}
