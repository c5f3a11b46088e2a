// Conversions between the runtime's runtime::Role, the proto's loopmoe.v1.Role and metric labels
// (names for messages: runtime::to_string).
#pragma once

#include <optional>

#include "proto/loopmoe.pb.h"
#include "runtime/process_runtime.h"

namespace loopmoe::process {

// Metric label value and command-line spelling: "worker" / "expert_shard".
inline const char* role_label(runtime::Role role) {
  return role == runtime::Role::kWorker ? "worker" : "expert_shard";
}

inline loopmoe::v1::Role to_proto(runtime::Role role) {
  return role == runtime::Role::kWorker ? loopmoe::v1::WORKER : loopmoe::v1::EXPERT_SHARD;
}

// nullopt for ROLE_UNSPECIFIED and unknown values.
inline std::optional<runtime::Role> from_proto(loopmoe::v1::Role role) {
  switch (role) {
    case loopmoe::v1::WORKER:
      return runtime::Role::kWorker;
    case loopmoe::v1::EXPERT_SHARD:
      return runtime::Role::kExpertShard;
    default:
      return std::nullopt;
  }
}

}  // namespace loopmoe::process
