#include "bench/bench_common.h"

#include <chrono>
#include <cstdio>
#include <sstream>

#include "model/ops.h"

namespace loopmoe::bench {

std::vector<Case> make_cases(const std::vector<std::string>& configs,
                             const std::vector<int>& batches) {
  std::vector<Case> cases;
  for (const std::string& path : configs) {
    const model::Config cfg = model::load_config(path);
    const std::string file = path.substr(path.find_last_of('/') + 1);
    if (batches.empty()) {
      cases.push_back({path, file, cfg, false});
      continue;
    }
    for (int batch : batches) {
      Case c{path, file + "/" + std::to_string(batch), cfg, true};
      c.cfg.train.batch_size = batch;
      cases.push_back(c);
    }
  }
  return cases;
}

nlohmann::json run_peer(const PeerRequest& r) {
  std::ostringstream cmd;
  cmd << r.python << " " << r.script << " --config " << r.config << " --steps " << r.steps
      << " --threads " << r.threads;
  if (r.batch > 0) cmd << " --batch " << r.batch;
  if (!r.device.empty()) cmd << " --device " << r.device;
  if (!r.variant.empty()) cmd << " --variant " << r.variant;
  if (r.max_seconds > 0) cmd << " --max-seconds " << r.max_seconds;
  cmd << " --json";
  if (!r.keep_stderr) cmd << " 2>/dev/null";
  FILE* p = popen(cmd.str().c_str(), "r");
  if (p == nullptr) return nullptr;
  std::string out;
  char buf[512];
  while (fgets(buf, sizeof buf, p) != nullptr) out += buf;
  pclose(p);
  // The result is the last line that parses as a JSON object (the peer prints one).
  std::istringstream lines(out);
  nlohmann::json result;
  for (std::string line; std::getline(lines, line);) {
    if (line.empty() || line[0] != '{') continue;
    nlohmann::json parsed = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (parsed.is_object()) result = std::move(parsed);
  }
  return result;
}

double peer_tokens_per_s(const nlohmann::json& result) {
  if (!result.is_object() || !result.contains("tokens_per_s")) return 0;
  const nlohmann::json& t = result["tokens_per_s"];
  return t.is_number() ? t.get<double>() : 0;
}

void print_json_line(const nlohmann::json& object) {
  std::printf("%s\n", object.dump().c_str());
  std::fflush(stdout);
}

Profile profile_steps(int steps, const std::function<void(int)>& step) {
  namespace ops = model::ops;
  Profile p;
  p.steps = steps;
  if (steps <= 0) return p;
  ops::reset_op_profile();
  ops::set_op_profiling(true);
  const auto start = std::chrono::steady_clock::now();
  try {
    for (int i = 0; i < steps; ++i) step(i);
  } catch (...) {
    ops::set_op_profiling(false);
    throw;
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ops::set_op_profiling(false);
  p.step_ms = 1e3 * seconds / steps;
  for (const ops::OpTime& t : ops::op_profile()) {
    p.rows.push_back({t.name, static_cast<double>(t.calls) / steps, 1e3 * t.seconds / steps,
                      seconds > 0 ? t.seconds / seconds : 0});
  }
  ops::reset_op_profile();
  return p;
}

void print_profile(const std::string& case_name, const std::string& device, const Profile& p,
                   bool json) {
  if (json) {
    nlohmann::json rows = nlohmann::json::array();
    for (const ProfileRow& r : p.rows) {
      rows.push_back({{"op", r.op},
                      {"calls_per_step", r.calls_per_step},
                      {"ms_per_step", r.ms_per_step},
                      {"share", r.share}});
    }
    print_json_line({{"kind", "profile"},
                     {"case", case_name},
                     {"device", device},
                     {"steps", p.steps},
                     {"step_ms", p.step_ms},
                     {"ops", rows}});
    return;
  }
  double accounted = 0;
  for (const ProfileRow& r : p.rows) accounted += r.share;
  std::printf("  op profile of %s on %s: %d step(s), %.2f ms per profiled step, %.0f%% in ops\n",
              case_name.c_str(), device.c_str(), p.steps, p.step_ms, 100 * accounted);
  std::printf("    %-32s %10s %10s %7s\n", "op", "calls/step", "ms/step", "share");
  for (const ProfileRow& r : p.rows) {
    std::printf("    %-32s %10.1f %10.3f %6.1f%%\n", r.op.c_str(), r.calls_per_step, r.ms_per_step,
                100 * r.share);
  }
}

}  // namespace loopmoe::bench
