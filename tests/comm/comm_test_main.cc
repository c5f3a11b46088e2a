// Entry point of loopmoe_comm_tests. Besides running GoogleTest it has a child mode, used by the
// multi-process tests, which spawn this same binary as the other ranks:
//   loopmoe_comm_tests --comm-child SCENARIO STORE_DIR RANK SIZE
#include <gtest/gtest.h>

#include <cstring>

namespace loopmoe::comm::testing {
int run_child(int argc, char** argv);  // test_gloo_multiprocess.cc
}

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--comm-child") == 0) {
    return loopmoe::comm::testing::run_child(argc, argv);
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
