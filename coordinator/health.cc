#include "coordinator/health.h"

#include <absl/synchronization/notification.h>
#include <grpcpp/client_context.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/support/byte_buffer.h>

#include <vector>

namespace loopmoe::coordinator {
namespace {

const char* status_name(uint64_t value) {
  switch (value) {
    case 0:
      return "UNKNOWN";
    case 1:
      return "SERVING";
    case 2:
      return "NOT_SERVING";
    case 3:
      return "SERVICE_UNKNOWN";
    default:
      return "INVALID";
  }
}

}  // namespace

HealthResult check_health(const std::shared_ptr<grpc::Channel>& channel,
                          std::chrono::milliseconds timeout, const std::string& service) {
  // HealthCheckRequest { string service = 1; }: tag 0x0a, length, bytes (empty message for "").
  std::string request_bytes;
  if (!service.empty()) {
    request_bytes.push_back('\x0a');
    request_bytes.push_back(static_cast<char>(service.size()));  // names are < 128 bytes
    request_bytes += service;
  }
  grpc::Slice slice(request_bytes);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  context.set_wait_for_ready(true);  // wait for the server to come up, within the deadline

  grpc::GenericStub stub(channel);
  grpc::Status status;  // written by the callback before it notifies `done`
  absl::Notification done;
  stub.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) {
                   status = std::move(s);
                   done.Notify();
                 });
  done.WaitForNotification();

  HealthResult result;
  if (!status.ok()) {
    result.error = status.error_message().empty()
                       ? "status code " + std::to_string(status.error_code())
                       : status.error_message();
    return result;
  }
  // HealthCheckResponse { ServingStatus status = 1; }: tag 0x08 then a varint; absent = UNKNOWN.
  std::vector<grpc::Slice> slices;
  (void)response.Dump(&slices);
  std::string bytes;
  for (const grpc::Slice& s : slices)
    bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  uint64_t value = 0;
  if (bytes.size() >= 2 && bytes[0] == '\x08') value = static_cast<uint8_t>(bytes[1]) & 0x7f;
  result.ok = true;
  result.status = status_name(value);
  return result;
}

}  // namespace loopmoe::coordinator
