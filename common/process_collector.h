// The standard process_* series (common/process_stats.h) as a prometheus-cpp Collectable, read
// from /proc at each scrape; the coordinator and the training processes register it beside their
// registries. Its own target (loopmoe_process_collector), so loopmoe_common stays free of
// prometheus-cpp.
#pragma once

#include <prometheus/collectable.h>

#include <memory>

namespace loopmoe::common {

// Stateless: one may be shared by any number of exposers.
std::shared_ptr<prometheus::Collectable> make_process_collector();

}  // namespace loopmoe::common
