// cuBLAS loaded at run time (model/cuda/cublas_loader.h): the table resolves, its errors name the
// library and the fix, and it adds no static TLS (a thread with civetweb's 100 KB stack still
// starts). None of these needs a GPU, so they run in CI.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>
#include <pthread.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "model/cuda/cublas_loader.h"

namespace loopmoe::model::ops::cuda {
namespace {

std::string load_error(const CublasLibraryFiles& files) {
  try {
    load_cublas_api(files);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "(no exception)";
}

// The build that compiled this test had the toolkit's cuBLAS, so it must load here; calling
// cublasGetStatusString through its pointer (no GPU needed) checks that the pointer is the
// function its declared type says.
TEST(CudaCublasLoader, ResolvesEveryFunctionOfTheTable) {
  const CublasApi& api = cublas();
#define LOOPMOE_EXPECT_RESOLVED(library, symbol, type) EXPECT_NE(api.symbol, nullptr) << #symbol;
  LOOPMOE_CUBLAS_FUNCTIONS(LOOPMOE_EXPECT_RESOLVED)
#undef LOOPMOE_EXPECT_RESOLVED
  EXPECT_EQ(&cublas(), &api);  // loaded once
  // Its text ("an unsupported value or parameter was passed ..." in cuBLAS 13) differs by status.
  const char* invalid = api.cublasGetStatusString(CUBLAS_STATUS_INVALID_VALUE);
  const char* success = api.cublasGetStatusString(CUBLAS_STATUS_SUCCESS);
  ASSERT_NE(invalid, nullptr);
  ASSERT_NE(success, nullptr);
  EXPECT_GT(std::strlen(invalid), 0u);
  EXPECT_STRNE(invalid, success);
}

TEST(CudaCublasLoader, MissingLibraryIsOneErrorNamingItAndTheFix) {
  CublasLibraryFiles files = default_cublas_library_files();
  EXPECT_EQ(files[static_cast<int>(CublasLibrary::kCublas)],
            "libcublas.so." + std::to_string(CUBLAS_VER_MAJOR));
  files[static_cast<int>(CublasLibrary::kCublas)] = "libcublas-not-installed.so.13";
  const std::string error = load_error(files);
  EXPECT_NE(error.find("cannot load libcublas-not-installed.so.13 (dlopen: "), std::string::npos)
      << error;
  EXPECT_NE(error.find("LD_LIBRARY_PATH"), std::string::npos) << error;
}

// A library that exists but is not cuBLAS (the CUDA runtime this test links): the first
// function of the table is missing, and the error names it.
TEST(CudaCublasLoader, MissingFunctionIsNamed) {
  CublasLibraryFiles files = default_cublas_library_files();
  const std::string cudart = "libcudart.so." + std::to_string(CUDART_VERSION / 1000);
  files[static_cast<int>(CublasLibrary::kCublas)] = cudart;
  const std::string error = load_error(files);
  EXPECT_NE(error.find(cudart + " has no function cublasCreate_v2 (dlsym: "), std::string::npos)
      << error;
  EXPECT_NE(error.find("LD_LIBRARY_PATH"), std::string::npos) << error;
}

// Why cuBLAS is loaded with dlopen: linked, cuBLASLt's ~94 KB of static TLS is carved out of
// every thread's stack and a 100 KB stack (civetweb's, the Prometheus metrics server's) no
// longer fits (pthread_create fails with EINVAL). Loaded, its TLS is dynamic, so such a thread
// starts before and after the first load (in this executable, which has the CUDA runtime's and
// OpenBLAS's static TLS too), and can call cuBLAS.
TEST(CudaCublasLoader, ThreadsWithCivetwebStacksStart) {
  auto start_small_thread = [](void* (*body)(void*)) {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 100 * 1024);
    pthread_t thread;
    const int rc = pthread_create(&thread, &attr, body, nullptr);
    pthread_attr_destroy(&attr);
    if (rc == 0) pthread_join(thread, nullptr);
    return rc;
  };
  void* (*idle)(void*) = [](void*) -> void* { return nullptr; };
  const int before = start_small_thread(idle);
  EXPECT_EQ(before, 0) << std::strerror(before);
  cublas();  // loads libcublas and libcublasLt into the process (if not yet)
  void* (*calls_cublas)(void*) = [](void*) -> void* {
    return const_cast<char*>(cublas().cublasGetStatusString(CUBLAS_STATUS_SUCCESS));
  };
  const int after = start_small_thread(calls_cublas);
  EXPECT_EQ(after, 0) << std::strerror(after);
}

}  // namespace
}  // namespace loopmoe::model::ops::cuda
