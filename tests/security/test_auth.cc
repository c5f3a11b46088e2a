// security/ on its own: the permission of every RPC, the token check, constant-time comparison,
// loading and generating credentials; and the coordinator's output_dir confinement.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "coordinator/output_dir.h"
#include "proto/loopmoe.grpc.pb.h"
#include "security/auth.h"
#include "security/flags.h"
#include "security/generate.h"
#include "tests/security/test_credentials.h"

namespace loopmoe::security {
namespace {

namespace fs = std::filesystem;

// A service of proto/loopmoe.proto, as protobuf describes it.
const google::protobuf::ServiceDescriptor* service(const char* name) {
  return v1::JobSpec::descriptor()->file()->FindServiceByName(name);
}

std::vector<std::string> methods_of(const google::protobuf::ServiceDescriptor* service) {
  std::vector<std::string> out;
  for (int i = 0; i < service->method_count(); ++i) {
    out.push_back("/" + service->full_name() + "/" + service->method(i)->name());
  }
  return out;
}

TEST(Permissions, EveryMethodOfBothServicesHasOne) {
  const std::set<std::string> control = {"SubmitJob", "GetJob",   "ListJobs",
                                         "CancelJob", "WatchJob", "ListCheckpoints"};
  const auto* coordinator = service("Coordinator");
  for (const std::string& method : methods_of(coordinator)) {
    const std::string name = method.substr(method.rfind('/') + 1);
    ASSERT_TRUE(method_permission(method).has_value()) << method;
    EXPECT_EQ(*method_permission(method),
              control.count(name) ? Permission::kControl : Permission::kProcess)
        << method;
  }
  for (const std::string& method : methods_of(service("TrainingProcess"))) {
    ASSERT_TRUE(method_permission(method).has_value()) << method;
    EXPECT_EQ(*method_permission(method), Permission::kProcess) << method;
  }
  EXPECT_EQ(method_permission("/grpc.health.v1.Health/Check"), Permission::kOpen);
  EXPECT_EQ(method_permission("/grpc.health.v1.Health/Watch"), Permission::kOpen);
  EXPECT_FALSE(method_permission("/loopmoe.v1.Coordinator/Nope").has_value());
  EXPECT_FALSE(method_permission("").has_value());
}

TEST(Permissions, ConstantTimeEqual) {
  EXPECT_TRUE(constant_time_equal("", ""));
  EXPECT_TRUE(constant_time_equal("abcdef", "abcdef"));
  EXPECT_FALSE(constant_time_equal("abcdef", "abcdeg"));
  EXPECT_FALSE(constant_time_equal("abcdef", "abcde"));
  EXPECT_FALSE(constant_time_equal("xbcdef", "abcdef"));
}

TEST(TokenCheck, DecidesByMethodTokenAndCertificate) {
  const std::string cli(32, 'c'), process(32, 'p');
  const TokenAuthProcessor mtls(cli, process, /*require_client_cert=*/true);
  const std::string bearer_cli = "Bearer " + cli, bearer_process = "Bearer " + process;
  const std::string submit = "/loopmoe.v1.Coordinator/SubmitJob";
  const std::string kv_set = "/loopmoe.v1.Coordinator/KvSet";
  const std::string shutdown = "/loopmoe.v1.TrainingProcess/Shutdown";
  struct Case {
    std::string method;
    std::optional<std::string> authorization;
    bool certified;
    grpc::StatusCode expected;
  };
  const std::vector<Case> cases = {
      {"/grpc.health.v1.Health/Check", std::nullopt, false, grpc::StatusCode::OK},
      {submit, std::nullopt, false, grpc::StatusCode::UNAUTHENTICATED},
      {submit, cli, false, grpc::StatusCode::UNAUTHENTICATED},  // no "Bearer "
      {submit, "Bearer " + std::string(32, 'x'), false, grpc::StatusCode::UNAUTHENTICATED},
      {submit, "Bearer ", false, grpc::StatusCode::UNAUTHENTICATED},
      {submit, bearer_cli, false, grpc::StatusCode::OK},
      {submit, bearer_process, true, grpc::StatusCode::PERMISSION_DENIED},
      {kv_set, bearer_cli, true, grpc::StatusCode::PERMISSION_DENIED},
      {shutdown, bearer_cli, true, grpc::StatusCode::PERMISSION_DENIED},
      {kv_set, bearer_process, false, grpc::StatusCode::UNAUTHENTICATED},  // no client cert
      {kv_set, bearer_process, true, grpc::StatusCode::OK},
      {shutdown, bearer_process, true, grpc::StatusCode::OK},
      {"/loopmoe.v1.Coordinator/Nope", bearer_process, true, grpc::StatusCode::PERMISSION_DENIED},
  };
  for (const Case& c : cases) {
    const grpc::Status status = mtls.check(
        c.method,
        c.authorization ? std::optional<std::string_view>(*c.authorization) : std::nullopt,
        c.certified);
    EXPECT_EQ(status.error_code(), c.expected)
        << c.method << " " << c.authorization.value_or("(none)") << " cert " << c.certified << ": "
        << status.error_message();
  }
  // Without mutual TLS the token alone is enough; an empty token accepts nothing.
  const TokenAuthProcessor tokens_only("", process, /*require_client_cert=*/false);
  EXPECT_TRUE(tokens_only.check(kv_set, bearer_process, false).ok());
  EXPECT_EQ(tokens_only.check(submit, "Bearer ", false).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
}

TEST(Credentials, GeneratedFilesAreCompleteAndPrivate) {
  const CredentialFiles& f = testing::test_credential_files();
  for (const fs::path& p : {f.ca, f.cert, f.key, f.cli_token, f.process_token}) {
    EXPECT_TRUE(fs::exists(p)) << p;
  }
  EXPECT_FALSE(fs::exists(f.ca.parent_path() / "ca.key")) << "the CA key must not be kept";
  for (const fs::path& p : {f.key, f.cli_token, f.process_token}) {
    EXPECT_EQ(fs::status(p).permissions() & (fs::perms::group_all | fs::perms::others_all),
              fs::perms::none)
        << p;
  }
  const std::string cli = read_token(f.cli_token.string(), "cli");
  const std::string process = read_token(f.process_token.string(), "process");
  EXPECT_EQ(cli.size(), 64u);
  EXPECT_NE(cli, process);
  EXPECT_NE(random_token(), random_token());
}

TEST(Credentials, LoadNamesWhatIsMissingOrWrong) {
  const CredentialFiles& f = testing::test_credential_files();
  auto error_of = [](const ServerFlags& flags, bool coordinator) -> std::string {
    try {
      load(flags, coordinator, "test");
    } catch (const std::runtime_error& e) {
      return e.what();
    }
    return "";
  };
  ServerFlags flags;
  EXPECT_EQ(error_of(flags, false),
            "--tls-ca (or LOOPMOE_TLS_CA) is required: the service uses TLS and tokens unless "
            "started with --insecure");
  flags.ca_file = f.ca.string();
  flags.cert_file = f.cert.string();
  flags.key_file = f.key.string();
  flags.process_token_file = f.process_token.string();
  EXPECT_EQ(error_of(flags, false), "");
  EXPECT_NE(error_of(flags, true).find("--cli-token-file"), std::string::npos);
  flags.cli_token_file = f.process_token.string();
  EXPECT_NE(error_of(flags, true).find("hold the same token"), std::string::npos);
  flags.cli_token_file = f.cli_token.string();
  EXPECT_EQ(error_of(flags, true), "");
  flags.cert_file = f.cli_token.string();
  EXPECT_EQ(error_of(flags, true), "--tls-cert " + f.cli_token.string() + ": not a PEM file");
  flags.cert_file = "/nonexistent/cert.pem";
  EXPECT_NE(error_of(flags, true).find("/nonexistent/cert.pem: cannot read"), std::string::npos);
  ServerFlags insecure;
  insecure.insecure = true;
  EXPECT_EQ(error_of(insecure, true), "");
  insecure.process_token_file = f.process_token.string();
  EXPECT_NE(error_of(insecure, true).find("--insecure cannot be combined"), std::string::npos);
  // A short token is refused.
  const fs::path short_token = f.ca.parent_path() / "short.token";
  std::ofstream(short_token) << "abc\n";
  ServerFlags short_flags = flags;
  short_flags.process_token_file = short_token.string();
  short_flags.cert_file = f.cert.string();
  EXPECT_NE(error_of(short_flags, false).find("at least 16 characters, found 3"),
            std::string::npos);
  fs::remove(short_token);
}

class OutputDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::temp_directory_path() / "loopmoe-outdir-XXXXXX").string();
    base_ = mkdtemp(pattern.data());
    root_ = base_ / "root";
    fs::create_directories(root_ / "jobs");
    fs::create_directories(base_ / "outside");
  }
  void TearDown() override { fs::remove_all(base_); }
  std::string error_of(const std::string& dir) {
    try {
      coordinator::confine_output_dir(dir, root_.string());
    } catch (const std::invalid_argument& e) {
      return e.what();
    }
    return "";
  }
  fs::path base_, root_;
};

TEST_F(OutputDirTest, InsideTheRootIsResolved) {
  EXPECT_EQ(coordinator::confine_output_dir((root_ / "jobs/./a/../b").string(), root_.string()),
            (fs::canonical(root_) / "jobs/b").string());
  EXPECT_EQ(coordinator::confine_output_dir("runs/x", root_.string()),
            (fs::canonical(root_) / "runs/x").string());
  EXPECT_EQ(coordinator::confine_output_dir(root_.string(), root_.string()),
            fs::canonical(root_).string());
}

TEST_F(OutputDirTest, EscapesAreRefused) {
  EXPECT_NE(
      error_of((root_ / "../outside").string()).find("is outside the coordinator's data root"),
      std::string::npos);
  EXPECT_NE(error_of("../outside/x").find("outside"), std::string::npos);
  EXPECT_NE(error_of("/etc").find("outside"), std::string::npos);
  // A sibling whose name starts like the root is not under it.
  fs::create_directories(base_ / "root2");
  EXPECT_NE(error_of((base_ / "root2").string()).find("outside"), std::string::npos);
  // A symlink inside the root that leads out of it.
  fs::create_directory_symlink(base_ / "outside", root_ / "link");
  EXPECT_NE(error_of((root_ / "link/run").string()).find("outside"), std::string::npos);
  EXPECT_NE(error_of("link").find("outside"), std::string::npos);
}

}  // namespace
}  // namespace loopmoe::security
