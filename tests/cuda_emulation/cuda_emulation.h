// A CPU emulation of the few CUDA features the fused attention kernels
// (model/cuda/flash_attention.cuh) and the grouped expert products (model/cuda/expert_gemm.cuh)
// use, so that their index arithmetic, masking, tiling, online softmax and synchronisation are
// tested against CPU references on machines without a GPU (CI's). Each CUDA thread of a block is a host thread; blocks run one after another.
// __syncthreads is a barrier of the block's threads, __shfl_xor_sync an exchange through a slot
// per lane between two barriers of the warp's 32 threads (every lane must take part, as the
// kernels' full-mask shuffles require on the GPU too). Dynamic shared memory starts as NaN, so a
// read of anything the block has not written shows up in the results.
//
// What it cannot show: timing, occupancy, shared-memory limits, races that the barriers happen to
// hide, and the GPU's own expf/logf (the host's libm stands in). Include this before the kernel
// header, in a test translation unit only.
#pragma once

#include <algorithm>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

#include "model/bf16.h"

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

#define __global__
#define __device__
#define __host__
#define __launch_bounds__(...)

namespace cuda_emulation {

// What one block's threads share.
struct Block {
  explicit Block(int threads, size_t shared_floats)
      : block_barrier(threads),
        shuffle_slots(static_cast<size_t>(threads)),
        shared(shared_floats, std::numeric_limits<float>::quiet_NaN()) {
    for (int w = 0; w < threads / 32; ++w)
      warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<float> shuffle_slots;
  std::vector<float> shared;
};

inline thread_local Block* t_block = nullptr;

inline float* dynamic_shared() { return t_block->shared.data(); }

}  // namespace cuda_emulation

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline void __syncthreads() { cuda_emulation::t_block->block_barrier.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned /*mask*/, float value, int offset) {
  cuda_emulation::Block& b = *cuda_emulation::t_block;
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* slots = b.shuffle_slots.data() + warp * 32;
  slots[lane] = value;
  b.warp_barriers[warp]->arrive_and_wait();
  const float other = slots[lane ^ static_cast<unsigned>(offset)];
  b.warp_barriers[warp]->arrive_and_wait();  // nobody overwrites a slot before it is read
  return other;
}

inline float __uint_as_float(uint32_t u) { return std::bit_cast<float>(u); }
inline uint32_t __float_as_uint(float f) { return std::bit_cast<uint32_t>(f); }

inline void __syncwarp(unsigned /*mask*/ = 0xffffffffu) {
  cuda_emulation::t_block->warp_barriers[threadIdx.x / 32]->arrive_and_wait();
}

// bfloat16 with CUDA's conversions (round to nearest even, as model/bf16.h).
struct __nv_bfloat16 {
  uint16_t bits;
};
inline __nv_bfloat16 __float2bfloat16(float x) {
  return __nv_bfloat16{
      static_cast<uint16_t>(loopmoe::model::bf16_round_bits(std::bit_cast<uint32_t>(x)) >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 x) {
  return std::bit_cast<float>(static_cast<uint32_t>(x.bits) << 16);
}

// nvcuda::wmma for 16×16×16 tiles: a fragment holds the whole logical tile in every lane (the
// hardware spreads it over the warp in an unspecified layout, which the kernels never depend on:
// they only load, store, multiply, fill and apply one operation to every element). Stores are
// made by lane 0 alone, so a kernel that reads a stored tile from other lanes without a
// __syncwarp/__syncthreads in between reads poison or stale data here, as it could on a GPU.
namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation has 16x16x16 tiles only");
  static constexpr int num_elements = 256;
  float x[256];  // element (r, c) of the logical tile at x[16 r + c]
};

inline float to_float(float x) { return x; }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Use, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const P* p, unsigned ldm) {
  const bool row = std::is_same_v<Layout, row_major>;
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) f.x[16 * r + c] = to_float(row ? p[r * ldm + c] : p[c * ldm + r]);
  }
}
template <typename T>
void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const float* p, unsigned ldm,
                      layout_t layout) {
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      f.x[16 * r + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
    }
  }
}
template <typename T>
void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm,
                       layout_t layout) {
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[16 * r + c];
    }
  }
}
template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
  for (float& v : f.x) v = value;
}
// d = a b + c, fp32 accumulation over k in order.
template <typename TA, typename LA, typename TB, typename LB, typename TC>
void mma_sync(fragment<accumulator, 16, 16, 16, TC>& d,
              const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
              const fragment<accumulator, 16, 16, 16, TC>& c) {
  float out[256];
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 16; ++n) {
      float acc = c.x[16 * r + n];
      for (int k = 0; k < 16; ++k) acc = std::fma(a.x[16 * r + k], b.x[16 * k + n], acc);
      out[16 * r + n] = acc;
    }
  }
  std::copy(out, out + 256, d.x);
}
}  // namespace nvcuda::wmma

// The dynamic shared memory of flash_attention.cuh's and expert_gemm.cuh's kernels.
#define LOOPMOE_FLASH_DYNAMIC_SHARED(name) float* name = ::cuda_emulation::dynamic_shared()
#define LOOPMOE_DYNAMIC_SHARED(name) float* name = ::cuda_emulation::dynamic_shared()

namespace cuda_emulation {

// kernel<<<grid, block, shared_floats * sizeof(float)>>>(args...) for 1-D blocks whose size is a
// multiple of 32.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, int threads, size_t shared_floats, Args... args) {
  if (threads <= 0 || threads % 32 != 0) throw std::invalid_argument("launch: threads % 32 != 0");
  gridDim = grid;
  blockDim = dim3{static_cast<unsigned>(threads), 1, 1};
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block block(threads, shared_floats);
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          t_block = &block;
          threadIdx = dim3{static_cast<unsigned>(t), 0, 0};
          blockIdx = dim3{bx, by, 0};
          kernel(args...);
        });
      }
      for (std::thread& th : pool) th.join();
    }
  }
}

}  // namespace cuda_emulation
