// Small helpers shared by the coordinator's .cc files (wall-clock stamps, printf-style messages,
// job ids as numbers, names of roles and gRPC status codes in messages). Private to coordinator/:
// nothing outside it includes this header.
#pragma once

#include <absl/status/status.h>
#include <absl/time/clock.h>
#include <absl/time/time.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <string>

#include "proto/loopmoe.grpc.pb.h"

namespace loopmoe::coordinator::internal {

// Milliseconds since the Unix epoch: the stamps of job records and log lines.
inline int64_t unix_ms() { return absl::ToUnixMillis(absl::Now()); }

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

// gRPC's codes are numbered as absl::StatusCode's (both follow google.rpc.Code).
inline std::string code_name(grpc::StatusCode code) {
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

}  // namespace loopmoe::coordinator::internal
