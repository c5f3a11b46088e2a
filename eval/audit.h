// Measured audit of a trained run: FLOPs executed per token by op kind (against the analytic
// budget), routing statistics per (layer, iteration), drops, experts visited per token.
#pragma once

#include <string>

namespace loopmoe::eval {

struct AuditOptions {
  int batches = 4;  // validation batches (train.batch_size × seq_len tokens each)
  int threads = 1;
};

// Reads RUN/checkpoint.bin (and its config), runs validation batches, writes RUN/audit.json and
// returns its text. Schema: docs/AUDIT.md.
std::string run_audit(const std::string& run_dir, const AuditOptions& options);

}  // namespace loopmoe::eval
