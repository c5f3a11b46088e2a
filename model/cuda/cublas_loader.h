// cuBLAS, loaded with dlopen at the CUDA backend's first matrix product instead of linked.
//
// Why: libcublas.so.13 pulls in libcublasLt.so.13, whose ~94 KB thread-local segment becomes
// *static* TLS when the library is a link-time dependency: it is carved out of the stack of every
// thread of the executable, and a thread with a 100 KB stack (civetweb's: prometheus-cpp's
// Exposer, the `--metrics-listen` server) can no longer even start (pthread_create: EINVAL; the
// metrics server died with "null context when constructing CivetServer"). A dlopen'ed library's
// TLS is allocated per thread on first use (neither library is marked STATIC_TLS), so loading
// cuBLAS this way costs nothing to threads that never call it, and a process that never runs a
// GPU product never loads it. (The CUDA runtime's own 4 KB of static TLS is kept out of the
// service executables by linking the backend into the GPU executables only: cuda_backend.h.)
//
// The backend calls cuBLAS only through cublas() below, never by name: nothing links libcublas
// (model/cuda/CMakeLists.txt), so a direct call such as cublasSgemm_v2(...) fails to link instead
// of quietly bringing the static TLS back. This header includes cublas_api.h for its types and
// declarations only (the declarations give each pointer its exact type), not cublas_v2.h, whose
// macros rename cublasCreate to cublasCreate_v2 and so on: the table uses the exported names.
#pragma once

#include <cublas_api.h>

#include <array>
#include <string>

namespace loopmoe::model::ops::cuda {

// The shared libraries the table loads from. cuBLASLt (libcublasLt.so.N, e.g. for cublasLtMatmul
// in bf16) would be a second entry, with its header included above.
enum class CublasLibrary : int { kCublas, kCount };

// X(library, symbol): every cuBLAS function the backend calls, by its exported name (`_v2` where
// cublas_v2.h maps the plain name to it). Adding a function (cublasGemmEx, a cuBLASLt call) is
// one line here; the loader resolves every entry, so a missing one is reported at load time.
#define LOOPMOE_CUBLAS_FUNCTIONS(X) \
  X(kCublas, cublasCreate_v2)       \
  X(kCublas, cublasSetMathMode)     \
  X(kCublas, cublasGetStatusString) \
  X(kCublas, cublasSgemm_v2)        \
  X(kCublas, cublasSgemmStridedBatched)

// One pointer per function, named as the function and typed from its declaration in the header
// the backend was compiled against (decltype of a declaration: no reference to the symbol).
struct CublasApi {
#define LOOPMOE_CUBLAS_POINTER(library, symbol) decltype(&::symbol) symbol = nullptr;
  LOOPMOE_CUBLAS_FUNCTIONS(LOOPMOE_CUBLAS_POINTER)
#undef LOOPMOE_CUBLAS_POINTER
};

// The process's table: the libraries are opened (dlopen, RTLD_NOW | RTLD_LOCAL, never closed)
// and every function resolved exactly once, on the first call from any thread (std::call_once).
// When a library or a function is missing, this call and every later one throw the same
// std::runtime_error naming the library, dlerror()'s text and the fix; loading is not retried.
const CublasApi& cublas();

// The file each library is opened by: its soname for the cuBLAS major version of the headers
// this was compiled with (libcublas.so.13 for CUDA 13), found by the dynamic loader's search
// (LD_LIBRARY_PATH, the executable's RUNPATH, ld.so.cache).
using CublasLibraryFiles = std::array<std::string, static_cast<int>(CublasLibrary::kCount)>;
CublasLibraryFiles default_cublas_library_files();

// Loads a table from `files` (cublas() loads it from default_cublas_library_files() once), or
// throws as cublas() does. Libraries opened by a failed call are closed again. For tests: the
// error paths with a library that does not exist or lacks a function.
CublasApi load_cublas_api(const CublasLibraryFiles& files);

}  // namespace loopmoe::model::ops::cuda
