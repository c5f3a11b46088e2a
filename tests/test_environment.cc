// Tests run single-threaded unless a test asks for more: on a loaded 2-vCPU machine an idle
// OpenMP team costs more than the tiny test models compute. Under an OPENBLAS_CORETYPE this CPU
// cannot execute (ctest's per-core-type runs), every test is skipped with the reason.
#include <gtest/gtest.h>

#include "model/model.h"
#include "tests/openblas_coretype.h"

namespace {
class SingleThreaded : public ::testing::Environment {
 public:
  void SetUp() override {
    if (auto why = loopmoe::testing::unsupported_openblas_coretype()) GTEST_SKIP() << *why;
    loopmoe::model::set_num_threads(1);
  }
};
const auto* const kEnvironment = ::testing::AddGlobalTestEnvironment(new SingleThreaded);
}  // namespace
