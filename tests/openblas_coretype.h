// ctest runs the numerics-sensitive tests once per OpenBLAS kernel choice (OPENBLAS_CORETYPE
// unset, Haswell, SkylakeX; tests/CMakeLists.txt): the engine's results must not depend on it
// (docs/MODEL.md "Batch-invariant numerics"). A core type this CPU cannot execute is skipped
// with a message instead of dying of an illegal instruction.
#pragma once

#include <cstdlib>
#include <optional>
#include <string>

namespace loopmoe::testing {

// Why the OPENBLAS_CORETYPE in the environment cannot run on this CPU, or nothing.
inline std::optional<std::string> unsupported_openblas_coretype() {
  const char* env = std::getenv("OPENBLAS_CORETYPE");
  if (env == nullptr || *env == '\0') return std::nullopt;
  const std::string core = env;
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if ((core == "SkylakeX" || core == "Cooperlake" || core == "SapphireRapids") && !avx512) {
    return "OPENBLAS_CORETYPE=" + core + " needs AVX-512, which this CPU does not have";
  }
  if ((core == "Haswell" || core == "Zen") && !avx2) {
    return "OPENBLAS_CORETYPE=" + core + " needs AVX2 and FMA, which this CPU does not have";
  }
  return std::nullopt;
}

}  // namespace loopmoe::testing
