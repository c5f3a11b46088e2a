// Tests run single-threaded unless a test asks for more: on a loaded 2-vCPU machine an idle
// OpenMP team costs more than the tiny test models compute.
#include <gtest/gtest.h>

#include "model/model.h"

namespace {
class SingleThreaded : public ::testing::Environment {
 public:
  void SetUp() override { loopmoe::set_num_threads(1); }
};
const auto* const kEnvironment = ::testing::AddGlobalTestEnvironment(new SingleThreaded);
}  // namespace
