// The real loopmoe-worker / loopmoe-expert-shard executables as child processes, against the fake
// coordinator: --help, a clear failure without a coordinator, registration, the process series of
// /metrics, and clean exits on Shutdown(exit) and SIGTERM. Skipped when the executables are not
// built (not built).
#include <arpa/inet.h>
#include <fcntl.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "tests/http_get.h"
#include "tests/process/fakes.h"
#include "tests/security/test_credentials.h"

extern char** environ;

namespace loopmoe::process {
namespace {

namespace pb = loopmoe::v1;
using namespace std::chrono_literals;
using testing::eventually;

std::string executable(const std::string& name) {
  return std::string(LOOPMOE_BUILD_DIR) + "/" + name;
}

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// A child process with stdout and stderr captured in files.
class Child {
 public:
  Child(const std::vector<std::string>& args, bool with_coordinator_env = false) {
    dir_ = std::filesystem::temp_directory_path() /
           ("loopmoe_process_test_" + std::to_string(getpid()) + "_" + std::to_string(counter_++));
    std::filesystem::create_directories(dir_);
    std::vector<std::string> env;
    for (char** e = environ; *e; ++e) {
      // None of the caller's LOOPMOE_* settings (coordinator, TLS files, tokens) leak in.
      if (!std::string(*e).starts_with("LOOPMOE_")) env.push_back(*e);
    }
    if (with_coordinator_env) env.push_back("LOOPMOE_COORDINATOR=" + coordinator_env_);
    pid_ = fork();
    if (pid_ == 0) {
      const int out = open((dir_ / "stdout").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      const int err = open((dir_ / "stderr").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(out, 1);
      dup2(err, 2);
      std::vector<char*> argv, envp;
      for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      for (const std::string& e : env) envp.push_back(const_cast<char*>(e.c_str()));
      envp.push_back(nullptr);
      execve(argv[0], argv.data(), envp.data());
      _exit(127);
    }
  }
  ~Child() {
    if (pid_ > 0 && !exit_code_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }

  // The exit code once the child exits within `timeout` (-signal if killed by one).
  std::optional<int> wait_exit(std::chrono::milliseconds timeout) {
    eventually(
        [&] {
          int status = 0;
          if (waitpid(pid_, &status, WNOHANG) == pid_) {
            exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
          }
          return exit_code_.has_value();
        },
        timeout);
    return exit_code_;
  }

  pid_t pid() const { return pid_; }
  std::string out() const { return read_file(dir_ / "stdout"); }
  std::string err() const { return read_file(dir_ / "stderr"); }
  static void set_coordinator_env(const std::string& value) { coordinator_env_ = value; }

 private:
  static inline int counter_ = 0;
  static inline std::string coordinator_env_;
  std::filesystem::path dir_;
  pid_t pid_ = -1;
  std::optional<int> exit_code_;
};

class ExecutableTest : public ::testing::Test {};

TEST_F(ExecutableTest, HelpListsTheFlags) {
  for (const char* name : {"loopmoe-worker", "loopmoe-expert-shard"}) {
    Child child({executable(name), "--help"});
    ASSERT_EQ(child.wait_exit(20s), 0) << name << ": " << child.err();
    for (const char* flag : {"--coordinator", "--listen", "--metrics-listen", "--hostname",
                             "--name", "--connect-timeout"}) {
      EXPECT_NE(child.out().find(flag), std::string::npos) << name << " --help lacks " << flag;
    }
  }
}

TEST_F(ExecutableTest, MissingCoordinatorIsAnError) {
  Child child({executable("loopmoe-worker")});
  const std::optional<int> code = child.wait_exit(20s);
  ASSERT_TRUE(code.has_value());
  EXPECT_NE(*code, 0);
  EXPECT_NE((child.out() + child.err()).find("--coordinator"), std::string::npos)
      << child.out() << child.err();
}

TEST_F(ExecutableTest, UnreachableCoordinatorExitsOneWithOneErrorLine) {
  const auto start = std::chrono::steady_clock::now();
  const security::CredentialFiles& creds = security::testing::test_credential_files();
  Child child({executable("loopmoe-worker"), "--coordinator", "127.0.0.1:1", "--connect-timeout",
               "1", "--tls-ca", creds.ca.string(), "--tls-cert", creds.cert.string(), "--tls-key",
               creds.key.string(), "--process-token-file", creds.process_token.string(), "--mtls"});
  ASSERT_EQ(child.wait_exit(20s), 1) << child.err();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 15s);
  const std::string err = child.err();
  EXPECT_TRUE(
      err.starts_with("error: loopmoe-worker: cannot reach the coordinator at "
                      "127.0.0.1:1 (tried for 1 s)"))
      << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  EXPECT_EQ(child.out(), "");
}

TEST_F(ExecutableTest, WithoutCredentialsOrInsecureItRefusesToStart) {
  Child child({executable("loopmoe-expert-shard"), "--coordinator", "127.0.0.1:1"});
  ASSERT_EQ(child.wait_exit(20s), 1) << child.err();
  EXPECT_EQ(child.err(),
            "error: loopmoe-expert-shard: --tls-ca (or LOOPMOE_TLS_CA) is required: the service "
            "uses TLS and tokens unless started with --insecure\n");
}

TEST_F(ExecutableTest, InsecureCannotBeMixedWithCredentials) {
  Child child({executable("loopmoe-worker"), "--coordinator", "127.0.0.1:1", "--insecure",
               "--process-token-file", "/nonexistent"});
  ASSERT_EQ(child.wait_exit(20s), 1) << child.err();
  EXPECT_NE(child.err().find("--insecure cannot be combined"), std::string::npos) << child.err();
}

// The executables below run against the fake coordinator, which serves plaintext: --insecure.
class ExecutableWithCoordinatorTest : public ExecutableTest {
 protected:
  testing::FakeCoordinator coordinator_;
  std::unique_ptr<testing::TestServer> server_ = testing::serve({&coordinator_});
};

TEST_F(ExecutableWithCoordinatorTest, RegistersAndExitsOnShutdownWithExit) {
  coordinator_.set_heartbeat_interval_ms(50);
  Child child({executable("loopmoe-worker"), "--coordinator", server_->address, "--name", "w0",
               "--metrics-listen", "127.0.0.1:0", "--insecure"});
  ASSERT_TRUE(eventually([&] { return coordinator_.registrations().size() == 1; }, 20s))
      << child.err();
  const pb::RegisterRequest registered = coordinator_.registrations()[0];
  EXPECT_EQ(registered.role(), pb::WORKER);
  EXPECT_EQ(registered.name(), "w0");
  EXPECT_TRUE(registered.metrics_address().starts_with("127.0.0.1:"));
  ASSERT_TRUE(eventually([&] {
    return child.out().find("worker listening on " + registered.address() + " (coordinator " +
                            server_->address + ")\n") != std::string::npos;
  })) << child.out();
  EXPECT_TRUE(eventually([&] { return coordinator_.heartbeat_ids().size() >= 2; }));

  auto stub = pb::TrainingProcess::NewStub(
      grpc::CreateChannel(registered.address(), grpc::InsecureChannelCredentials()));
  pb::ShutdownRequest shutdown;
  shutdown.set_exit(true);
  pb::ShutdownResponse response;
  grpc::ClientContext context;
  ASSERT_TRUE(stub->Shutdown(&context, shutdown, &response).ok());
  EXPECT_EQ(child.wait_exit(20s), 0) << child.err();
}

TEST_F(ExecutableWithCoordinatorTest, ExitsCleanlyOnSigtermAndReadsTheEnvironment) {
  Child::set_coordinator_env(server_->address);
  Child child({executable("loopmoe-expert-shard"), "--insecure"}, /*with_coordinator_env=*/true);
  ASSERT_TRUE(eventually([&] { return coordinator_.registrations().size() == 1; }, 20s))
      << child.err();
  EXPECT_EQ(coordinator_.registrations()[0].role(), pb::EXPERT_SHARD);
  ASSERT_TRUE(eventually(
      [&] { return child.out().find("expert shard listening on") != std::string::npos; }));
  kill(child.pid(), SIGTERM);
  EXPECT_EQ(child.wait_exit(20s), 0) << child.err();
  EXPECT_NE(child.err().find("SIGTERM"), std::string::npos) << child.err();
}

TEST_F(ExecutableWithCoordinatorTest, BothExecutablesServeTheProcessSeries) {
  for (const char* name : {"loopmoe-worker", "loopmoe-expert-shard"}) {
    const size_t registered_before = coordinator_.registrations().size();
    Child child({executable(name), "--coordinator", server_->address, "--metrics-listen",
                 "127.0.0.1:0", "--insecure"});
    ASSERT_TRUE(eventually(
        [&] { return coordinator_.registrations().size() == registered_before + 1; }, 20s))
        << name << ": " << child.err();
    const std::string address = coordinator_.registrations().back().metrics_address();
    const std::string text = http_get_metrics(address);
    EXPECT_NE(text.find("200 OK"), std::string::npos) << name << ": " << text;
    for (const char* series :
         {"process_cpu_seconds_total", "process_resident_memory_bytes",
          "process_virtual_memory_bytes", "process_open_fds", "process_max_fds",
          "process_start_time_seconds", "process_threads"}) {
      EXPECT_NE(text.find(std::string("\n") + series + " "), std::string::npos)
          << name << " lacks " << series << "\n"
          << text;
    }
    kill(child.pid(), SIGTERM);
    EXPECT_EQ(child.wait_exit(20s), 0) << name << ": " << child.err();
  }
}

}  // namespace
}  // namespace loopmoe::process
