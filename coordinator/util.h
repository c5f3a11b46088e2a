// Small helpers shared by the coordinator's .cc files (wall-clock stamps, printf-style messages,
// job ids as numbers, names of roles and gRPC status codes in messages). Private to coordinator/:
// nothing outside it includes this header.
#pragma once

#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <string>

#include "proto/loopmoe.grpc.pb.h"

namespace loopmoe::coordinator::internal {

// Milliseconds since the Unix epoch: the stamps of job records and log lines.
inline int64_t unix_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Job ids are decimal integers; the scheduler's queue holds them as numbers (FIFO = id order).
inline int64_t job_number(const std::string& job_id) { return std::stoll(job_id); }

inline std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline std::string format(const char* fmt, ...) {
  char buf[512];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, args);
  va_end(args);
  return buf;
}

inline std::string role_name(v1::Role role) {
  return role == v1::EXPERT_SHARD ? "shard" : role == v1::WORKER ? "worker" : "process";
}

inline std::string code_name(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    default:
      return "code " + std::to_string(static_cast<int>(code));
  }
}

}  // namespace loopmoe::coordinator::internal
