// Conversions between the runtime's dist::Role, the proto's loopmoe.v1.Role and metric labels
// (names for messages: dist::to_string).
#pragma once

#include <optional>

#include "dist/process_runtime.h"
#include "proto/loopmoe.pb.h"

namespace loopmoe::process {

// Metric label value and command-line spelling: "worker" / "expert_shard".
inline const char* role_label(dist::Role role) {
  return role == dist::Role::kWorker ? "worker" : "expert_shard";
}

inline loopmoe::v1::Role to_proto(dist::Role role) {
  return role == dist::Role::kWorker ? loopmoe::v1::WORKER : loopmoe::v1::EXPERT_SHARD;
}

// nullopt for ROLE_UNSPECIFIED and unknown values.
inline std::optional<dist::Role> from_proto(loopmoe::v1::Role role) {
  switch (role) {
    case loopmoe::v1::WORKER:
      return dist::Role::kWorker;
    case loopmoe::v1::EXPERT_SHARD:
      return dist::Role::kExpertShard;
    default:
      return std::nullopt;
  }
}

}  // namespace loopmoe::process
