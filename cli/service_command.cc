// `loopmoe submit | status | list | cancel | logs | cluster`: run by the `loopmoe-service` binary
// next to this one (cli/service/). Those commands link libprotobuf (gRPC), and libsentencepiece
// (`data prepare`) exports its own bundled protobuf 3.14: in one process, either the static
// initialisers crash or sentencepiece refuses the newer runtime. So `loopmoe` hands the whole
// command line of these subcommands to the helper, which parses it (and prints their --help).
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "cli/commands.h"

namespace loopmoe::cli {
namespace {

[[noreturn]] void exec_service(const std::string& command, const std::vector<std::string>& args) {
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) throw std::runtime_error("cannot read /proc/self/exe: " + ec.message());
  const std::filesystem::path helper = self.parent_path() / "loopmoe-service";
  std::vector<std::string> argv{helper.string(), command};
  argv.insert(argv.end(), args.begin(), args.end());
  std::vector<char*> c_argv;
  for (std::string& a : argv) c_argv.push_back(a.data());
  c_argv.push_back(nullptr);
  execv(helper.c_str(), c_argv.data());
  throw std::runtime_error("cannot run " + helper.string() + " (" + std::strerror(errno) +
                           "): build it, e.g. cmake --build " + self.parent_path().string() +
                           " --target loopmoe-service");
}

void add_passthrough(CLI::App& app, const std::string& name, const std::string& description) {
  auto* cmd = app.add_subcommand(name, description);
  cmd->set_help_flag();  // --help goes to the helper, which knows the options
  cmd->prefix_command();
  cmd->allow_extras();
  cmd->callback([cmd, name] { exec_service(name, cmd->remaining()); });
}

}  // namespace

void register_service_commands(CLI::App& app) {
  add_passthrough(app, "submit", "Submit a training job to the coordinator (training service)");
  add_passthrough(app, "status", "Show a job of the coordinator");
  add_passthrough(app, "list", "List the coordinator's jobs");
  add_passthrough(app, "cancel", "Cancel a queued or running job");
  add_passthrough(app, "logs", "Print a job's log");
}

void register_cluster_command(CLI::App& app) {
  add_passthrough(app, "cluster", "Run the training service on this machine (cluster up)");
}

}  // namespace loopmoe::cli
