#include "process/coordinator_store.h"

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include <algorithm>
#include <thread>
#include <utility>

#include "comm/comm_error.h"

namespace loopmoe::process {
namespace {

using Clock = std::chrono::steady_clock;

// This thread's CoordinatorStore::AbandonWaitsIf condition (innermost), if any.
thread_local const std::function<bool()>* abandon_waits_if = nullptr;

[[noreturn]] void throw_rpc_error(const std::string& address, const char* rpc,
                                  const std::string& what, const grpc::Status& status) {
  std::string message = "coordinator store (" + address + "): " + rpc + " " + what + " failed: ";
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
    message += "coordinator unreachable (" + status.error_message() + ")";
  } else {
    message += status.error_message().empty() ? "gRPC status " + std::to_string(status.error_code())
                                              : status.error_message();
  }
  if (status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    throw comm::TimeoutError(message);
  }
  throw comm::CommError(message);
}

std::string missing_keys_message(const std::string& address,
                                 const google::protobuf::RepeatedPtrField<std::string>& missing,
                                 std::chrono::milliseconds timeout) {
  constexpr int kShown = 4;
  std::string message = "coordinator store (" + address + "): timed out after " +
                        std::to_string(timeout.count()) + " ms waiting for " +
                        std::to_string(missing.size()) + " key(s): ";
  for (int i = 0; i < missing.size() && i < kShown; ++i) {
    message += (i ? ", '" : "'") + missing[i] + "'";
  }
  if (missing.size() > kShown) message += ", ...";
  return message;
}

}  // namespace

CoordinatorStore::AbandonWaitsIf::AbandonWaitsIf(std::function<bool()> abandoned)
    : abandoned_(std::move(abandoned)), previous_(abandon_waits_if) {
  abandon_waits_if = &abandoned_;
}

CoordinatorStore::AbandonWaitsIf::~AbandonWaitsIf() { abandon_waits_if = previous_; }

CoordinatorStore::CoordinatorStore(std::shared_ptr<grpc::Channel> channel, std::string address,
                                   std::chrono::milliseconds rpc_timeout)
    : stub_(loopmoe::v1::Coordinator::NewStub(std::move(channel))),
      address_(std::move(address)),
      rpc_timeout_(rpc_timeout) {}

CoordinatorStore::CoordinatorStore(const std::string& address)
    : CoordinatorStore(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()), address) {}

void CoordinatorStore::set(const std::string& key, const std::string& value) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + rpc_timeout_);
  loopmoe::v1::KvSetRequest request;
  request.set_key(key);
  request.set_value(value);
  loopmoe::v1::KvSetResponse response;
  grpc::Status status = stub_->KvSet(&context, request, &response);
  if (!status.ok()) throw_rpc_error(address_, "KvSet", "'" + key + "'", status);
}

std::optional<std::string> CoordinatorStore::get(const std::string& key) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + rpc_timeout_);
  loopmoe::v1::KvGetRequest request;
  request.set_key(key);
  loopmoe::v1::KvGetResponse response;
  grpc::Status status = stub_->KvGet(&context, request, &response);
  if (!status.ok()) throw_rpc_error(address_, "KvGet", "'" + key + "'", status);
  if (!response.found()) return std::nullopt;
  return std::move(*response.mutable_value());
}

void CoordinatorStore::wait(const std::vector<std::string>& keys,
                            std::chrono::milliseconds timeout) {
  if (keys.empty()) return;
  const Clock::time_point deadline = Clock::now() + timeout;
  const std::function<bool()>* abandoned = abandon_waits_if;
  const std::chrono::milliseconds max_slice =
      abandoned ? std::min(max_wait_slice_, std::chrono::milliseconds(1000)) : max_wait_slice_;
  loopmoe::v1::KvWaitRequest request;
  for (const std::string& key : keys) request.add_keys(key);
  while (true) {
    const auto remaining =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    const auto slice = std::clamp(remaining, std::chrono::milliseconds(0), max_slice);
    request.set_timeout_ms(slice.count());
    const Clock::time_point sent = Clock::now();
    grpc::ClientContext context;
    // The server holds the call for up to `slice`; allow it rpc_timeout_ on top to answer.
    context.set_deadline(std::chrono::system_clock::now() + slice + rpc_timeout_);
    loopmoe::v1::KvWaitResponse response;
    grpc::Status status = stub_->KvWait(&context, request, &response);
    if (!status.ok()) {
      throw_rpc_error(address_, "KvWait", std::to_string(keys.size()) + " key(s)", status);
    }
    if (response.missing().empty()) return;
    if (Clock::now() >= deadline) {
      throw comm::TimeoutError(missing_keys_message(address_, response.missing(), timeout));
    }
    if (abandoned && (*abandoned)()) {
      throw comm::CommError("coordinator store (" + address_ + "): rendezvous abandoned: the " +
                            "coordinator cancelled the call waiting for " +
                            std::to_string(response.missing().size()) + " key(s), e.g. '" +
                            response.missing(0) + "'");
    }
    // A coordinator that answers before the slice is over must not turn this into a busy loop.
    if (Clock::now() - sent < std::chrono::milliseconds(5)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    // Ask again only for what is still missing.
    request.clear_keys();
    for (const std::string& key : response.missing()) request.add_keys(key);
  }
}

}  // namespace loopmoe::process
