// `loopmoe data ...`: dataset preparation and inspection.
#pragma once

namespace CLI {
class App;
}

namespace loopmoe::cli {

// Adds `data prepare` (text -> tokenizer + token shards) and `data info` (validate and describe a
// shard) to `app`. Errors end the command as every other one's do (cli/run_cli.h).
void register_data_command(CLI::App& app);

}  // namespace loopmoe::cli
