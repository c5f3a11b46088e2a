#include "security/credentials.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/auth_metadata_processor.h>
#include <sys/random.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "security/auth.h"

namespace loopmoe::security {
namespace {

// Adds "authorization: Bearer <token>" to every call of a channel.
class BearerTokenPlugin final : public grpc::MetadataCredentialsPlugin {
 public:
  explicit BearerTokenPlugin(std::string token) : value_(kBearerPrefix + std::move(token)) {}
  bool IsBlocking() const override { return false; }
  const char* GetType() const override { return "loopmoe-bearer"; }
  grpc::Status GetMetadata(grpc::string_ref, grpc::string_ref, const grpc::AuthContext&,
                           std::multimap<std::string, std::string>* metadata) override {
    metadata->emplace(kAuthorizationKey, value_);
    return grpc::Status::OK;
  }

 private:
  const std::string value_;
};

std::string read_file(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw std::runtime_error(what + " " + path + ": cannot read (" + std::strerror(errno) + ")");
  }
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

void add_exclusive_listening_port(grpc::ServerBuilder& builder, const std::string& listen,
                                  std::shared_ptr<grpc::ServerCredentials> credentials, int* port) {
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddListeningPort(listen, std::move(credentials), port);
}

std::shared_ptr<grpc::ServerCredentials> server_credentials(const Credentials& credentials) {
  if (credentials.insecure) return grpc::InsecureServerCredentials();
  if (credentials.cert_pem.empty() || credentials.key_pem.empty()) {
    throw std::runtime_error(
        "TLS needs a server certificate and key (--tls-cert, --tls-key), or --insecure");
  }
  if (credentials.mutual_tls && credentials.ca_pem.empty()) {
    throw std::runtime_error("mutual TLS needs the CA that signs client certificates (--tls-ca)");
  }
  // Client certificates are verified when shown but not required at the handshake: the CLI has
  // none. The processor then requires one on process RPCs when mutual_tls is set.
  grpc::SslServerCredentialsOptions options(credentials.ca_pem.empty()
                                                ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                                : GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY);
  options.pem_root_certs = credentials.ca_pem;
  options.pem_key_cert_pairs.push_back({credentials.key_pem, credentials.cert_pem});
  std::shared_ptr<grpc::ServerCredentials> server = grpc::SslServerCredentials(options);
  server->SetAuthMetadataProcessor(std::make_shared<TokenAuthProcessor>(
      credentials.cli_token, credentials.process_token, credentials.mutual_tls));
  return server;
}

std::shared_ptr<grpc::Channel> create_channel(const std::string& address,
                                              const Credentials& credentials,
                                              const std::string& token,
                                              grpc::ChannelArguments args) {
  if (credentials.insecure) {
    return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
  }
  if (credentials.ca_pem.empty()) {
    throw std::runtime_error("TLS needs the CA certificate (--tls-ca), or --insecure");
  }
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = credentials.ca_pem;
  if (credentials.mutual_tls) {
    options.pem_private_key = credentials.key_pem;
    options.pem_cert_chain = credentials.cert_pem;
  }
  std::shared_ptr<grpc::ChannelCredentials> channel = grpc::SslCredentials(options);
  if (!token.empty()) {
    channel = grpc::CompositeChannelCredentials(
        channel, grpc::MetadataCredentialsFromPlugin(std::make_unique<BearerTokenPlugin>(token)));
  }
  if (!credentials.server_name.empty()) args.SetSslTargetNameOverride(credentials.server_name);
  return grpc::CreateCustomChannel(address, channel, args);
}

std::string read_pem(const std::string& path, const std::string& what) {
  std::string text = read_file(path, what);
  if (text.find("-----BEGIN ") == std::string::npos) {
    throw std::runtime_error(what + " " + path + ": not a PEM file");
  }
  return text;
}

std::string read_token(const std::string& path, const std::string& what) {
  std::string text = read_file(path, what);
  const size_t begin = text.find_first_not_of(" \t\r\n");
  const size_t end = text.find_last_not_of(" \t\r\n");
  text = begin == std::string::npos ? std::string() : text.substr(begin, end - begin + 1);
  if (text.size() < 16) {
    throw std::runtime_error(what + " " + path + ": a token needs at least 16 characters, found " +
                             std::to_string(text.size()));
  }
  if (text.find_first_of(" \t\r\n") != std::string::npos) {
    throw std::runtime_error(what + " " + path + ": the token holds whitespace");
  }
  return text;
}

std::string random_token() {
  unsigned char bytes[32];
  size_t got = 0;
  while (got < sizeof(bytes)) {
    const ssize_t n = getrandom(bytes + got, sizeof(bytes) - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw std::runtime_error(std::string("getrandom: ") + std::strerror(errno));
    got += static_cast<size_t>(n);
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string token;
  for (unsigned char b : bytes) {
    token += kHex[b >> 4];
    token += kHex[b & 15];
  }
  return token;
}

}  // namespace loopmoe::security
