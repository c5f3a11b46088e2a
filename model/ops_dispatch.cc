// The ops.h functions: each one sends its call to the backend of the process's default device
// (model/buffer.h default_device()): Device::kCpu to the CPU kernels (model/cpu/, ops_cpu.h),
// Device::kCuda to the CUDA backend linked into the executable (model/cuda_backend.h: model/cuda/,
// ops_cuda.h; float only), and the test-only Device::kHostAsDevice to the CPU kernels after
// checking that every pointer the kernel takes as device memory lies in a Buffer of that emulated
// device (a host vector handed to a kernel would be a host pointer on a real GPU).
//
// The CPU kernels keep their own files and compile flags (model/CMakeLists.txt); this file has
// none of those flags and no arithmetic, so the CPU results are those of a direct call, bit for
// bit. One dispatcher per entry of model/ops_list.h, generated below (LOOPMOE_DISPATCHER).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <initializer_list>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "model/buffer.h"
#include "model/cpu/ops_cpu.h"
#include "model/cuda_backend.h"
#include "model/ops.h"
#include "model/ops_list.h"

namespace loopmoe::model::ops {
namespace {

// Every entry of ops_list.h names an ops.h function of exactly that type: the cast selects the
// ops.h overload with these parameter and return types, and fails to compile when there is none
// (a list entry that ops.h lacks, or declares differently). Checked here, before the dispatchers
// below declare the list's signatures themselves.
template <typename T>
constexpr bool list_matches_ops_h() {
#define LOOPMOE_CHECK_DECLARED(ret, name, params, args, device_pointers) \
  static_cast<void>(static_cast<ret(*) params>(&name<T>));
  LOOPMOE_OPS(LOOPMOE_CHECK_DECLARED, T)
#undef LOOPMOE_CHECK_DECLARED
  return true;
}
constexpr bool float_list_matches_ops_h() {
#define LOOPMOE_CHECK_DECLARED(ret, name, params, args, device_pointers) \
  static_cast<void>(static_cast<ret(*) params>(&name));
  LOOPMOE_OPS_FLOAT(LOOPMOE_CHECK_DECLARED)
#undef LOOPMOE_CHECK_DECLARED
  return true;
}
static_assert(list_matches_ops_h<float>() && list_matches_ops_h<double>() &&
              float_list_matches_ops_h());

[[noreturn]] void double_on_cuda(const char* op) {
  throw std::logic_error(std::string("ops::") + op +
                         ": double on the CUDA device (the CUDA backend is float only; double is "
                         "for the CPU gradient checks)");
}

// The backend of a Device::kCuda call. Without one, set_default_device(Device::kCuda) has
// already refused, so this is a second line of defence.
CudaBackend& cuda_backend_for(const char* op) {
  CudaBackend* backend = cuda_backend();
  if (backend == nullptr) {
    throw std::runtime_error(std::string("ops::") + op +
                             ": the default device is CUDA but this executable has no CUDA "
                             "backend (model/cuda_backend.h)");
  }
  return *backend;
}

// Whether this call runs the CPU kernel. `device_pointers`: the arguments that ops.h takes as
// device memory (not those marked "host"); checked on the emulated device only, so kCpu pays one
// load and one compare.
template <typename T>
bool runs_on_cpu(const char* op, std::initializer_list<const void*> device_pointers) {
  switch (default_device()) {
    case Device::kCpu:
      return true;
    case Device::kHostAsDevice:
      for (const void* p : device_pointers) detail::check_host_as_device_pointer(p, op);
      return true;
    case Device::kCuda:
      if constexpr (!std::is_same_v<T, float>) double_on_cuda(op);
      return false;
  }
  return true;
}

// ---- The op profile (ops.h) ----
std::atomic<bool> g_profiling{false};
std::mutex g_profile_mutex;
std::map<std::string, OpTime>& profile_table() {
  static std::map<std::string, OpTime> table;
  return table;
}

// Times one dispatched call when the profile is on: constructed before the call, it records in
// its destructor, after a device synchronisation if the call went to CUDA (a failed
// synchronisation is left to surface at the next CUDA call: a destructor may not throw).
class OpTimer {
 public:
  explicit OpTimer(const char* name)
      : name_(g_profiling.load(std::memory_order_relaxed) ? name : nullptr) {
    if (name_ != nullptr) start_ = std::chrono::steady_clock::now();
  }
  ~OpTimer() {
    if (name_ == nullptr) return;
    if (default_device() == Device::kCuda && cuda_backend() != nullptr) {
      try {
        cuda_backend()->synchronize();
      } catch (...) {
      }
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const std::lock_guard<std::mutex> lock(g_profile_mutex);
    OpTime& entry = profile_table()[name_];
    entry.name = name_;
    ++entry.calls;
    entry.seconds += seconds;
  }
  OpTimer(const OpTimer&) = delete;
  OpTimer& operator=(const OpTimer&) = delete;

 private:
  const char* name_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace

void set_op_profiling(bool on) { g_profiling.store(on); }
bool op_profiling() { return g_profiling.load(); }

std::vector<OpTime> op_profile() {
  std::vector<OpTime> out;
  {
    const std::lock_guard<std::mutex> lock(g_profile_mutex);
    for (const auto& [name, entry] : profile_table()) out.push_back(entry);
  }
  std::stable_sort(out.begin(), out.end(),
                   [](const OpTime& a, const OpTime& b) { return a.seconds > b.seconds; });
  return out;
}

void reset_op_profile() {
  const std::lock_guard<std::mutex> lock(g_profile_mutex);
  profile_table().clear();
}

// For the entry X(void, silu_forward, (T* out, const T* inp, size_t n), (out, inp, n), (out, inp)):
//   template <typename T>
//   void silu_forward(T* out, const T* inp, size_t n) {
//     if (runs_on_cpu<T>("silu_forward", {out, inp})) return cpu::silu_forward(out, inp, n);
//     if constexpr (std::is_same_v<T, float>) {
//       return cuda_backend_for("silu_forward").silu_forward(out, inp, n);
//     } else {
//       double_on_cuda("silu_forward");  // runs_on_cpu<double> has thrown already
//     }
//   }
// and the same without the template, with T = float, for LOOPMOE_OPS_FLOAT.
#define LOOPMOE_DISPATCH(T, name, args, device_pointers)                                   \
  const OpTimer op_timer(#name);                                                           \
  if (runs_on_cpu<T>(#name, {LOOPMOE_OPS_UNPAREN device_pointers})) return cpu::name args; \
  if constexpr (std::is_same_v<T, float>) {                                                \
    return cuda_backend_for(#name).name args;                                              \
  } else {                                                                                 \
    double_on_cuda(#name);                                                                 \
  }
#define LOOPMOE_DISPATCHER(ret, name, params, args, device_pointers) \
  template <typename T>                                              \
  ret name params {                                                  \
    LOOPMOE_DISPATCH(T, name, args, device_pointers)                 \
  }
#define LOOPMOE_FLOAT_DISPATCHER(ret, name, params, args, device_pointers) \
  ret name params { LOOPMOE_DISPATCH(float, name, args, device_pointers) }

LOOPMOE_OPS(LOOPMOE_DISPATCHER, T)
LOOPMOE_OPS_FLOAT(LOOPMOE_FLOAT_DISPATCHER)

LOOPMOE_OPS(LOOPMOE_OPS_INSTANTIATE, float)
LOOPMOE_OPS(LOOPMOE_OPS_INSTANTIATE, double)

}  // namespace loopmoe::model::ops
