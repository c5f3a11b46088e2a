// `loopmoe data ...`: dataset preparation and inspection.
#pragma once

namespace CLI {
class App;
}

namespace loopmoe {

// Adds `data prepare` (text -> tokenizer + token shards) and `data info` (validate and describe a
// shard) to `app`. Failures print one line to stderr and exit with status 1.
void register_data_command(CLI::App& app);

}  // namespace loopmoe
