#include "bench/bench_common.h"

#include <cstdio>
#include <sstream>

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

}  // namespace loopmoe::bench
