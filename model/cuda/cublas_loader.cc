// The cuBLAS function table of cublas_loader.h: dlopen + dlsym, once per process.
#include "model/cuda/cublas_loader.h"

#include <dlfcn.h>

#include <mutex>
#include <stdexcept>
#include <string>

namespace loopmoe::model::ops::cuda {
namespace {

// What to do about any loading failure; the same words for a missing library and a missing
// function (an older or mismatched cuBLAS on the search path).
std::string remedy(const std::string& file) {
  return "the CUDA backend needs the cuBLAS of the CUDA toolkit it was built with (" + file +
         "): install the toolkit's cuBLAS, or put the directory holding " + file +
         " on LD_LIBRARY_PATH";
}

std::string dlerror_text() {
  const char* text = dlerror();
  return text != nullptr ? text : "no dlerror() message";
}

// The libraries a load_cublas_api call has opened, closed again unless it succeeds: a failed
// load leaves nothing behind (a successful one keeps them for the life of the process).
class OpenLibraries {
 public:
  explicit OpenLibraries(const CublasLibraryFiles& files) : files_(files) {}
  ~OpenLibraries() {
    for (void* handle : handles_) {
      if (handle != nullptr && !keep_) dlclose(handle);
    }
  }
  OpenLibraries(const OpenLibraries&) = delete;
  OpenLibraries& operator=(const OpenLibraries&) = delete;

  // `symbol` from `library`, which is opened on its first use. RTLD_LOCAL: cuBLAS's own symbols
  // do not become visible to later lookups; RTLD_NOW: a library whose own dependencies cannot be
  // resolved (e.g. libcublasLt missing) fails here rather than at some later call.
  void* resolve(CublasLibrary library, const char* symbol) {
    const int index = static_cast<int>(library);
    const std::string& file = files_[index];
    void*& handle = handles_[index];
    if (handle == nullptr) {
      dlerror();  // clear a stale message
      handle = dlopen(file.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (handle == nullptr) {
        throw std::runtime_error("cuBLAS: cannot load " + file + " (dlopen: " + dlerror_text() +
                                 "); " + remedy(file));
      }
    }
    dlerror();
    void* address = dlsym(handle, symbol);
    if (address == nullptr) {
      throw std::runtime_error("cuBLAS: " + file + " has no function " + symbol +
                               " (dlsym: " + dlerror_text() + "); " + remedy(file));
    }
    return address;
  }
  void keep() { keep_ = true; }

 private:
  const CublasLibraryFiles& files_;
  std::array<void*, static_cast<int>(CublasLibrary::kCount)> handles_{};
  bool keep_ = false;
};

}  // namespace

CublasLibraryFiles default_cublas_library_files() {
  CublasLibraryFiles files;
  files[static_cast<int>(CublasLibrary::kCublas)] =
      "libcublas.so." + std::to_string(CUBLAS_VER_MAJOR);
  return files;
}

CublasApi load_cublas_api(const CublasLibraryFiles& files) {
  OpenLibraries libraries(files);
  CublasApi api;
  // dlsym's void* to the function's pointer type: POSIX guarantees the round trip.
#define LOOPMOE_CUBLAS_RESOLVE(library, symbol, type) \
  api.symbol = reinterpret_cast<type>(libraries.resolve(CublasLibrary::library, #symbol));
  LOOPMOE_CUBLAS_FUNCTIONS(LOOPMOE_CUBLAS_RESOLVE)
#undef LOOPMOE_CUBLAS_RESOLVE
  libraries.keep();
  return api;
}

const CublasApi& cublas() {
  static std::once_flag once;
  static CublasApi api;
  static std::string error;  // non-empty: the load failed, and every call reports why
  std::call_once(once, [] {
    try {
      api = load_cublas_api(default_cublas_library_files());
    } catch (const std::exception& e) {
      error = e.what();
    }
  });
  if (!error.empty()) throw std::runtime_error(error);
  return api;
}

}  // namespace loopmoe::model::ops::cuda
