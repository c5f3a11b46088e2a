#include <gtest/gtest.h>

#include <fstream>

#include "model/config.h"
#include "model/error.h"

namespace loopmoe {
namespace {

const std::string kDir = std::string(LOOPMOE_SOURCE_DIR) + "/configs/";

TEST(Config, ShippedConfigsLoad) {
  model::Config v = model::load_config(kDir + "vanilla_tiny.toml");
  EXPECT_EQ(v.model.n_layers, 8);
  EXPECT_EQ(v.model.n_loops, 1);
  EXPECT_EQ(v.model.iter_adaln, model::IterAdaLNMode::kOff);
  model::Config l = model::load_config(kDir + "loopmoe_tiny.toml");
  EXPECT_EQ(l.model.n_layers * l.model.n_loops, v.model.n_layers);
  EXPECT_EQ(l.model.iter_adaln, model::IterAdaLNMode::kJoint);
}

TEST(Config, RoundTripsThroughCanonicalToml) {
  model::Config c = model::load_config(kDir + "loopmoe_tiny.toml");
  const std::string text = model::to_toml(c);
  model::Config d = model::parse_config(text, "roundtrip");
  EXPECT_EQ(model::to_toml(d), text);
  EXPECT_EQ(d.model.capacity_factor, c.model.capacity_factor);
  EXPECT_EQ(d.train.eps, c.train.eps);
}

// A string holding control characters (TOML escapes allow them) is written back escaped, so the
// canonical text a checkpoint stores parses again (found by fuzz/config_fuzzer).
TEST(Config, ControlCharactersRoundTrip) {
  model::Config c = model::load_config(kDir + "loopmoe_tiny.toml");
  c.data.dir = std::string("runs\x01\n\x7f\"q\"\\");
  const std::string text = model::to_toml(c);
  EXPECT_EQ(model::parse_config(text, "roundtrip").data.dir, c.data.dir);
}

void expect_error(const std::string& toml, const std::string& needle) {
  try {
    model::parse_config(toml, "test.toml");
    ADD_FAILURE() << "accepted: " << toml;
  } catch (const model::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("test.toml"), std::string::npos) << e.what();
  }
}

TEST(Config, RejectsBadInputWithOneClearError) {
  expect_error("[model]\nd_modle = 64\n", "unknown key model.d_modle");
  expect_error("[optimizer]\nlr = 1\n", "unknown section [optimizer]");
  expect_error("[model]\nd_model = \"wide\"\n", "model.d_model must be an integer");
  expect_error("[model]\nn_experts = 0\n", "model.n_experts = 0 is out of range");
  expect_error("[model]\nn_experts = 2\ntop_k = 3\n", "top_k = 3 exceeds model.n_experts = 2");
  expect_error("[model]\nhead_dim = 7\n", "head_dim must be even");
  expect_error("[model]\niter_adaln = \"both\"\n", "unknown IterAdaLN mode 'both'");
  expect_error("[train]\nlr = -1.0\n", "train.lr");
  expect_error("[model\n", "test.toml:");
  expect_error("[train]\nsteps = 10\nwarmup_steps = 20\n", "warmup_steps exceeds");
}

// A job file (training config + [job] for `loopmoe submit`) also trains locally: [job] is left to
// the service, and nothing of it reaches the canonical config.
TEST(Config, JobTableIsLeftToTheService) {
  const model::Config c =
      model::parse_config("[model]\nn_layers = 3\n[job]\nworkers = 2\nshards = 9\n", "job.toml");
  EXPECT_EQ(c.model.n_layers, 3);
  EXPECT_EQ(model::to_toml(c).find("job"), std::string::npos);
}

// docs/CONFIG.md documents every key, each as a table row "| `section.key` |".
TEST(Config, EveryKeyIsDocumented) {
  std::ifstream in(std::string(LOOPMOE_SOURCE_DIR) + "/docs/CONFIG.md");
  ASSERT_TRUE(in) << "docs/CONFIG.md missing";
  const std::string doc((std::istreambuf_iterator<char>(in)), {});
  for (const std::string& key : model::config_keys()) {
    EXPECT_NE(doc.find("| `" + key + "` |"), std::string::npos) << key << " is not documented";
  }
}

TEST(Config, MissingFileNamesThePath) {
  try {
    model::load_config("/nonexistent/x.toml");
    FAIL();
  } catch (const model::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/x.toml"), std::string::npos);
  }
}

}  // namespace
}  // namespace loopmoe
