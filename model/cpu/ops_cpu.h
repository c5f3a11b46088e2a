// The CPU backend of model/ops.h: the same functions with the same signatures in namespace
// loopmoe::model::ops::cpu, on host memory (model/cpu/ops_*.cc; OpenMP, the batch-invariant
// sgemm), instantiated for float and double. The ops.h functions dispatch here when the default
// device (model/buffer.h) is Device::kCpu, or the host-emulated Device::kHostAsDevice that tests
// the device seam without a GPU (model/ops_dispatch.cc). The contract of each function is its
// ops.h declaration; the declarations here are generated from model/ops_list.h, as
// model/cuda/ops_cuda.h's are.
// Internal to model/ (and its tests): the model-level code calls ops.h.
#pragma once

#include "model/ops.h"
#include "model/ops_list.h"

namespace loopmoe::model::ops::cpu {

LOOPMOE_OPS(LOOPMOE_OPS_DECLARE, T)
LOOPMOE_OPS_FLOAT(LOOPMOE_OPS_DECLARE_FLOAT)

}  // namespace loopmoe::model::ops::cpu
