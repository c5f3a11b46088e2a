// ProcessMetrics: the Prometheus text after steps, evaluations and job changes; and the HTTP
// endpoint.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <map>
#include <optional>
#include <sstream>
#include <thread>

#include "process/process_metrics.h"
#include "tests/http_get.h"

namespace loopmoe::process {
namespace {

using namespace std::chrono_literals;
using Labels = std::map<std::string, std::string>;

struct Sample {
  std::string name;
  Labels labels;
  double value = 0;
};

// Just enough of the text format for our own output (label values hold no quotes or commas).
std::vector<Sample> parse_samples(const std::string& text) {
  std::vector<Sample> samples;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty() || line[0] == '#') continue;
    Sample sample;
    size_t end_of_name = line.find_first_of("{ ");
    sample.name = line.substr(0, end_of_name);
    size_t value_start = end_of_name;
    if (line[end_of_name] == '{') {
      const size_t close = line.find('}', end_of_name);
      std::string labels = line.substr(end_of_name + 1, close - end_of_name - 1);
      std::istringstream pairs(labels);
      std::string pair;
      while (std::getline(pairs, pair, ',')) {
        const size_t eq = pair.find('=');
        sample.labels[pair.substr(0, eq)] = pair.substr(eq + 2, pair.size() - eq - 3);
      }
      value_start = close + 1;
    }
    sample.value = std::stod(line.substr(value_start));
    samples.push_back(sample);
  }
  return samples;
}

// The value of the one sample named `name` whose labels include `labels`; nullopt if there is
// none (a test failure is recorded if there are several).
std::optional<double> value_of(const std::string& text, const std::string& name,
                               const Labels& labels = {}) {
  std::optional<double> found;
  int matches = 0;
  for (const Sample& sample : parse_samples(text)) {
    if (sample.name != name) continue;
    bool all = true;
    for (const auto& [key, value] : labels) {
      auto it = sample.labels.find(key);
      all = all && it != sample.labels.end() && it->second == value;
    }
    if (all) {
      found = sample.value;
      ++matches;
    }
  }
  EXPECT_LE(matches, 1) << name << " matched several samples";
  return found;
}

int count_samples(const std::string& text, const std::string& name) {
  int n = 0;
  for (const Sample& sample : parse_samples(text)) n += sample.name == name;
  return n;
}

// Matches the fake runtime's reports (tests/process/fakes.h): worker 0, 4 experts.
runtime::StepReport report(int64_t step, int loops, int n_layers = 2, int experts = 4) {
  runtime::StepReport r;
  r.step = step;
  r.loops = loops;
  r.loss = 10.0 / static_cast<double>(step);
  r.dropped = 3;
  r.seconds = 0.5;
  r.alltoall_bytes = 1000 * loops;
  r.alltoall_seconds = 0.25 * loops;
  r.num_experts = experts;
  r.tokens = 2048;
  for (int a = 0; a < n_layers * loops; ++a) {
    for (int e = 0; e < experts; ++e) r.expert_tokens.push_back(100 * a + e + 1);
  }
  return r;
}

TEST(ProcessMetrics, StepsFillTheFamilies) {
  ProcessMetrics metrics(runtime::Role::kWorker);
  metrics.begin_job("j1", 0, 2);
  for (int step = 1; step <= 3; ++step) metrics.record_step(report(step, 2));
  const std::string text = metrics.text();
  const Labels job = {{"role", "worker"}, {"job_id", "j1"}, {"rank", "0"}};
  EXPECT_EQ(value_of(text, "loopmoe_steps_total", job), 3.0) << text;
  EXPECT_DOUBLE_EQ(*value_of(text, "loopmoe_train_loss", job), 10.0 / 3);
  EXPECT_DOUBLE_EQ(*value_of(text, "loopmoe_train_tokens_per_second", job), 4096.0);
  EXPECT_EQ(value_of(text, "loopmoe_alltoall_bytes_total", job), 6000.0);
  EXPECT_DOUBLE_EQ(*value_of(text, "loopmoe_alltoall_seconds_total", job), 1.5);
  EXPECT_EQ(value_of(text, "loopmoe_dropped_tokens_total", job), 9.0);
  EXPECT_EQ(value_of(text, "loopmoe_step_duration_seconds_count", job), 3.0);
  EXPECT_DOUBLE_EQ(*value_of(text, "loopmoe_step_duration_seconds_sum", job), 1.5);
  Labels bucket = job;
  bucket["le"] = "0.25";
  EXPECT_EQ(value_of(text, "loopmoe_step_duration_seconds_bucket", bucket), 0.0);
  bucket["le"] = "0.5";
  EXPECT_EQ(value_of(text, "loopmoe_step_duration_seconds_bucket", bucket), 3.0);

  // expert_tokens[a][e] = 100a + e + 1 with a = iteration * n_layers + layer, over 3 steps.
  EXPECT_EQ(count_samples(text, "loopmoe_expert_tokens_total"), 2 * 2 * 4);
  for (int iteration = 0; iteration < 2; ++iteration) {
    for (int layer = 0; layer < 2; ++layer) {
      for (int expert = 0; expert < 4; ++expert) {
        const int application = iteration * 2 + layer;
        Labels labels = job;
        labels["layer"] = std::to_string(layer);
        labels["iteration"] = std::to_string(iteration);
        labels["expert"] = std::to_string(expert);
        EXPECT_EQ(value_of(text, "loopmoe_expert_tokens_total", labels),
                  3.0 * (100 * application + expert + 1))
            << "layer " << layer << " iteration " << iteration << " expert " << expert;
      }
      // Busiest expert over mean: (100a + 4) / (100a + 2.5).
      const int application = iteration * 2 + layer;
      Labels labels = job;
      labels["layer"] = std::to_string(layer);
      labels["iteration"] = std::to_string(iteration);
      EXPECT_DOUBLE_EQ(*value_of(text, "loopmoe_expert_overload_factor", labels),
                       (100.0 * application + 4) / (100.0 * application + 2.5));
    }
  }
  EXPECT_EQ(value_of(text, "loopmoe_validation_loss"), std::nullopt) << "before any evaluation";
  metrics.record_validation_loss(3.25);
  EXPECT_EQ(value_of(metrics.text(), "loopmoe_validation_loss", job), 3.25);
}

TEST(ProcessMetrics, FewerLoopsRemoveStaleOverloadSeries) {
  ProcessMetrics metrics(runtime::Role::kWorker);
  metrics.begin_job("j1", 0, 2);
  metrics.record_step(report(1, 3));
  EXPECT_EQ(count_samples(metrics.text(), "loopmoe_expert_overload_factor"), 6);
  metrics.record_step(report(2, 1));
  const std::string text = metrics.text();
  EXPECT_EQ(count_samples(text, "loopmoe_expert_overload_factor"), 2);
  // Counters keep every iteration seen: iteration 2 ran once, iteration 0 twice.
  EXPECT_EQ(value_of(text, "loopmoe_expert_tokens_total",
                     {{"layer", "1"}, {"iteration", "2"}, {"expert", "0"}}),
            100.0 * 5 + 1);
  EXPECT_EQ(value_of(text, "loopmoe_expert_tokens_total",
                     {{"layer", "1"}, {"iteration", "0"}, {"expert", "0"}}),
            2 * (100.0 * 1 + 1));
}

TEST(ProcessMetrics, MisshapenExpertTableIsIgnored) {
  ProcessMetrics metrics(runtime::Role::kWorker);
  metrics.begin_job("j1", 0, 3);  // 3 layers, but the report has 2 layers' worth of rows
  metrics.record_step(report(1, 2, /*n_layers=*/2));
  const std::string text = metrics.text();
  EXPECT_EQ(count_samples(text, "loopmoe_expert_tokens_total"), 0);
  EXPECT_EQ(value_of(text, "loopmoe_steps_total"), 1.0);
}

TEST(ProcessMetrics, ShardsHaveNoLossSeries) {
  ProcessMetrics metrics(runtime::Role::kExpertShard);
  metrics.begin_job("j1", 1, 2);
  runtime::StepReport r = report(1, 2);
  r.loss = 0;
  r.expert_tokens.clear();
  metrics.record_step(r);
  metrics.record_validation_loss(0);
  const std::string text = metrics.text();
  EXPECT_EQ(count_samples(text, "loopmoe_train_loss"), 0);
  EXPECT_EQ(count_samples(text, "loopmoe_validation_loss"), 0);
  EXPECT_EQ(value_of(text, "loopmoe_steps_total",
                     {{"role", "expert_shard"}, {"rank", "1"}, {"job_id", "j1"}}),
            1.0);
}

TEST(ProcessMetrics, NextJobReplacesThePreviousJobsSeries) {
  ProcessMetrics metrics(runtime::Role::kWorker);
  metrics.begin_job("j1", 0, 2);
  metrics.record_step(report(1, 2));
  metrics.record_validation_loss(4.0);
  metrics.begin_job("j2", 1, 2);
  const std::string text = metrics.text();
  for (const Sample& sample : parse_samples(text)) {
    auto job = sample.labels.find("job_id");
    if (job != sample.labels.end()) {
      EXPECT_EQ(job->second, "j2") << sample.name;
    }
  }
  EXPECT_EQ(value_of(text, "loopmoe_steps_total", {{"job_id", "j2"}, {"rank", "1"}}), 0.0);
}

TEST(ProcessMetrics, HeartbeatAgeGrowsUntilAcknowledged) {
  ProcessMetrics metrics(runtime::Role::kWorker);
  std::this_thread::sleep_for(120ms);
  const double before =
      *value_of(metrics.text(), "loopmoe_heartbeat_age_seconds", {{"role", "worker"}});
  EXPECT_GE(before, 0.1);
  metrics.record_heartbeat_ack();
  const double after = *value_of(metrics.text(), "loopmoe_heartbeat_age_seconds");
  EXPECT_LT(after, before);
  EXPECT_LT(after, 0.1);
}

const char* const kProcessSeries[] = {"process_cpu_seconds_total",
                                      "process_resident_memory_bytes",
                                      "process_virtual_memory_bytes",
                                      "process_open_fds",
                                      "process_max_fds",
                                      "process_start_time_seconds",
                                      "process_threads"};

TEST(ProcessMetrics, TextHasTheStandardProcessSeries) {
  for (runtime::Role role : {runtime::Role::kWorker, runtime::Role::kExpertShard}) {
    ProcessMetrics metrics(role);
    const std::string text = metrics.text();
    for (const char* name : kProcessSeries) {
      // One series each, without labels.
      EXPECT_EQ(count_samples(text, name), 1) << name << "\n" << text;
      EXPECT_NE(text.find(std::string("\n") + name + " "), std::string::npos) << name;
    }
    EXPECT_NE(text.find("# TYPE process_cpu_seconds_total counter"), std::string::npos) << text;
    EXPECT_NE(text.find("# TYPE process_resident_memory_bytes gauge"), std::string::npos) << text;
    EXPECT_GT(*value_of(text, "process_resident_memory_bytes"), 0);
    EXPECT_GE(*value_of(text, "process_max_fds"), *value_of(text, "process_open_fds"));
  }
}

TEST(ProcessMetrics, ServesTheTextOverHttp) {
  ProcessMetrics metrics(runtime::Role::kWorker);
  const int port = metrics.serve("127.0.0.1:0");
  ASSERT_GT(port, 0);
  metrics.begin_job("j1", 0, 2);
  metrics.record_step(report(1, 1));
  const std::string response = http_get(port, "/metrics");
  EXPECT_NE(response.find("200 OK"), std::string::npos) << response;
  EXPECT_NE(response.find("loopmoe_steps_total{"), std::string::npos) << response;
  EXPECT_NE(response.find("loopmoe_heartbeat_age_seconds{"), std::string::npos) << response;
  for (const char* name : kProcessSeries) {
    EXPECT_NE(response.find(std::string("\n") + name + " "), std::string::npos) << name << "\n"
                                                                                << response;
  }
}

TEST(ProcessMetrics, ServeOnABusyPortFailsWithTheAddress) {
  ProcessMetrics first(runtime::Role::kWorker);
  const int port = first.serve("127.0.0.1:0");
  ProcessMetrics second(runtime::Role::kWorker);
  const std::string address = "127.0.0.1:" + std::to_string(port);
  try {
    second.serve(address);
    FAIL() << "two exposers on " << address;
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(address), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace loopmoe::process
