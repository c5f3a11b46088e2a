// An allocator for big parameter-sized buffers whose memory comes zeroed from the kernel
// (anonymous mmap) and whose value-initialisation writes nothing: pages never touched are never
// committed. A worker of the distributed service keeps the whole parameter layout (for its
// offsets) but touches only the ranges it replicates, so the experts' pages, which live on the
// expert shards, cost it address space and no memory.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <new>
#include <utility>
#include <vector>

namespace loopmoe::model {

template <typename T>
struct ZeroPageAllocator {
  using value_type = T;
  ZeroPageAllocator() = default;
  template <typename U>
  ZeroPageAllocator(const ZeroPageAllocator<U>&) noexcept {}

  T* allocate(size_t n) {
    void* p = mmap(nullptr, bytes(n), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t n) noexcept { munmap(p, bytes(n)); }
  // Value-initialisation (resize(n), vector(n)) leaves the kernel's zeros in place.
  template <typename U>
  void construct(U*) noexcept {}
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  template <typename U>
  bool operator==(const ZeroPageAllocator<U>&) const noexcept {
    return true;
  }

 private:
  static size_t bytes(size_t n) { return n > 0 ? n * sizeof(T) : 1; }
};

// Grows with resize() (zeros, uncommitted until written); do not assign(n, 0): that writes.
template <typename T>
using ZeroPageVector = std::vector<T, ZeroPageAllocator<T>>;

}  // namespace loopmoe::model
