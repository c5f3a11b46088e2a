// What the CPU and the GPU paths of loopmoe_bench share: the cases it measures (a config at a
// number of sequences per step), the PyTorch peer's invocation, and JSON lines.
#pragma once

#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/config.h"

namespace loopmoe::bench {

// One measured case: a config file at `batch` sequences per step (the config's train.batch_size
// unless --batch overrides it).
struct Case {
  std::string path;   // the config file
  std::string name;   // its file name, plus "/B" when --batch overrides the sequences per step
  model::Config cfg;  // cfg.train.batch_size is the case's batch
  bool batch_overridden = false;
};

// The cases of `configs` × `batches` (empty `batches`: each config's own batch_size).
std::vector<Case> make_cases(const std::vector<std::string>& configs,
                             const std::vector<int>& batches);

// How to run bench/torch_peer.py. The CPU path's command line is exactly the one the bench ran
// before --device existed (python /usr/bin/python3, stderr dropped, no --device or --variant).
struct PeerRequest {
  std::string python = "/usr/bin/python3";
  std::string script;
  std::string config;
  int steps = 10;
  int threads = 1;
  int batch = 0;             // > 0: --batch
  std::string device;        // non-empty: --device
  std::string variant;       // non-empty: --variant
  double max_seconds = 0;    // > 0: --max-seconds
  bool keep_stderr = false;  // false: 2>/dev/null (the CPU path, as before)
};

// Runs the peer and returns its JSON result, or a null json when it could not run (no python,
// no torch, a failure: the peer's own error goes to stderr when keep_stderr).
nlohmann::json run_peer(const PeerRequest& request);

// The peer's tokens/s, 0 when it failed.
double peer_tokens_per_s(const nlohmann::json& result);

// One JSON object on one line of stdout (the --json output).
void print_json_line(const nlohmann::json& object);

// --profile N: the op profile (model/ops.h set_op_profiling) of N more training steps of a case,
// after its timed ones. Per ops.h function: calls and milliseconds per step and the share of the
// profiled steps' time (on CUDA each op is followed by a device synchronisation, so a profiled
// step is slower than the measured one: read the shares).
struct ProfileRow {
  std::string op;
  double calls_per_step = 0, ms_per_step = 0, share = 0;
};
struct Profile {
  int steps = 0;
  double step_ms = 0;            // wall time per profiled step
  std::vector<ProfileRow> rows;  // most time first
};
// Runs step(i) for i < steps with the profile on (and resets it before and after).
Profile profile_steps(int steps, const std::function<void(int)>& step);
// A table under the case's row, or one {"kind": "profile", ...} JSON line.
void print_profile(const std::string& case_name, const std::string& device, const Profile& p,
                   bool json);

}  // namespace loopmoe::bench
