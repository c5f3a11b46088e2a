#include "common/process_collector.h"

#include <prometheus/metric_family.h>

#include <utility>
#include <vector>

#include "common/process_stats.h"

namespace loopmoe::common {
namespace {

class ProcessCollector final : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> families;
    for (const ProcessSample& sample : process_samples(read_process_stats())) {
      prometheus::MetricFamily family;
      family.name = sample.name;
      family.help = sample.help;
      family.type =
          sample.counter ? prometheus::MetricType::Counter : prometheus::MetricType::Gauge;
      prometheus::ClientMetric metric;
      (sample.counter ? metric.counter.value : metric.gauge.value) = sample.value;
      family.metric.push_back(std::move(metric));
      families.push_back(std::move(family));
    }
    return families;
  }
};

}  // namespace

std::shared_ptr<prometheus::Collectable> make_process_collector() {
  return std::make_shared<ProcessCollector>();
}

}  // namespace loopmoe::common
