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
#include <type_traits>

namespace loopmoe::model::ops::cuda {

// The shared libraries the table loads from. cuBLASLt (libcublasLt.so.N, e.g. for fused epilogues)
// would be a second entry, with its header included above; the bf16 products do not need it
// (cublasGemmEx takes bf16 operands with fp32 compute and output).
enum class CublasLibrary : int { kCublas, kCount };

// cublas_api.h overloads a few names in C++: cublasGemmEx and cublasGemmStridedBatchedEx also have
// a static inline wrapper taking the old cudaDataType compute type, so &::cublasGemmEx names no
// single function. Their entries give the exported function's pointer type (these aliases);
// CublasApi checks it against the header (the cast below selects an overload of exactly that type,
// or fails to compile), unevaluated, so nothing refers to the symbol.
using CublasGemmExFunction = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t,
                                                cublasOperation_t, int, int, int, const void*,
                                                const void*, cudaDataType, int, const void*,
                                                cudaDataType, int, const void*, void*, cudaDataType,
                                                int, cublasComputeType_t, cublasGemmAlgo_t);
using CublasGemmStridedBatchedExFunction = cublasStatus_t (*)(
    cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*, const void*,
    cudaDataType, int, long long int, const void*, cudaDataType, int, long long int, const void*,
    void*, cudaDataType, int, long long int, int, cublasComputeType_t, cublasGemmAlgo_t);

// X(library, symbol, type): every cuBLAS function the backend calls, by its exported name (`_v2`
// where cublas_v2.h maps the plain name to it), and its pointer type: LOOPMOE_CUBLAS_DECLARED
// (the type of the header's one declaration) or, for an overloaded name, an alias above. Adding a
// function (a cuBLASLt call) is one line here; the loader resolves every entry, so a missing one
// is reported at load time. The Ex products (bf16 operands, fp32 compute and output) are
// train.precision = "bf16" (ops_gemm.cu); the grouped one (cuBLAS 12.5+) runs the experts' fp32
// products (ops_gemm.cu gemm_grouped).
#define LOOPMOE_CUBLAS_DECLARED(symbol) decltype(&::symbol)
#define LOOPMOE_CUBLAS_FUNCTIONS(X)                                                         \
  X(kCublas, cublasCreate_v2, LOOPMOE_CUBLAS_DECLARED(cublasCreate_v2))                     \
  X(kCublas, cublasSetMathMode, LOOPMOE_CUBLAS_DECLARED(cublasSetMathMode))                 \
  X(kCublas, cublasGetStatusString, LOOPMOE_CUBLAS_DECLARED(cublasGetStatusString))         \
  X(kCublas, cublasSgemm_v2, LOOPMOE_CUBLAS_DECLARED(cublasSgemm_v2))                       \
  X(kCublas, cublasSgemmStridedBatched, LOOPMOE_CUBLAS_DECLARED(cublasSgemmStridedBatched)) \
  X(kCublas, cublasGemmEx, CublasGemmExFunction)                                            \
  X(kCublas, cublasGemmStridedBatchedEx, CublasGemmStridedBatchedExFunction)                \
  X(kCublas, cublasGemmGroupedBatchedEx, LOOPMOE_CUBLAS_DECLARED(cublasGemmGroupedBatchedEx))

// One pointer per function, named as the function and typed from its declaration in the header
// the backend was compiled against (no reference to the symbol: decltype, unevaluated).
struct CublasApi {
#define LOOPMOE_CUBLAS_POINTER(library, symbol, type)                                   \
  static_assert(std::is_same_v<decltype(static_cast<type>(&::symbol)), type>, #symbol); \
  type symbol = nullptr;
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
