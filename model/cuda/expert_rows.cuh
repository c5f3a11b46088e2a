// The routing's capacity walk and the expert-order rows of its kept slots on the device (ops.h
// moe_capacity_keep, moe_rows_by_expert): the router's drops and the dispatcher's layout without a
// host loop over the slots, or the copies of the choices there and of the results back. In a header
// of its own, like flash_attention.cuh, so that it also runs under tests/cuda_emulation/ against
// the CPU's kernels where no GPU is present: no CUDA API call here, the shared memory
// behind a macro.
#pragma once

#include <cstddef>
#include <cstdint>

#ifndef LOOPMOE_DYNAMIC_SHARED
#define LOOPMOE_DYNAMIC_SHARED(name) extern __shared__ __align__(128) float name[]
#endif

namespace loopmoe::model::ops::cuda::expert_rows {

constexpr int kThreads = 256;
constexpr int kSharedFloats = 2 * kThreads;  // two int arrays of the block's size

// The block-wide walk both kernels share: the slots in order, kThreads at a time, each thread
// told `rank`, the number of earlier slots (in slot order) for which counted(i) held, and whether
// counted(i) holds for its own slot i. A Hillis–Steele inclusive scan over shared memory
// (double-buffered) plus the count of the earlier rounds. visit(i, counted, rank) runs for every
// slot i < slots, on its thread; every thread of the block must call this (barriers inside).
// Returns the number of counted slots.
template <typename Counted, typename Visit>
__device__ int64_t walk_slots(size_t slots, Counted counted, Visit visit) {
  LOOPMOE_DYNAMIC_SHARED(smem);
  int* scan[2] = {reinterpret_cast<int*>(smem), reinterpret_cast<int*>(smem) + kThreads};
  const int j = threadIdx.x;
  int64_t before = 0;  // counted slots of the earlier rounds
  for (size_t base = 0; base < slots; base += kThreads) {
    const size_t i = base + j;
    const int mine = i < slots && counted(i) ? 1 : 0;
    int in = 0;
    scan[in][j] = mine;
    __syncthreads();
    for (int step = 1; step < kThreads; step *= 2) {  // inclusive scan
      scan[1 - in][j] = scan[in][j] + (j >= step ? scan[in][j - step] : 0);
      in = 1 - in;
      __syncthreads();
    }
    if (i < slots) visit(i, mine != 0, before + scan[in][j] - mine);
    before += scan[in][kThreads - 1];
    __syncthreads();  // every thread has read the total before the next round writes
  }
  return before;
}

// ops.h moe_rows_by_expert. One block per expert e: each kept slot of e gets its rank among e's
// kept slots plus offset[e]; a dropped slot of e gets −1. Every slot belongs to exactly one
// expert, so each row_of_slot entry is written once, by its expert's block; no atomics, the same
// result whatever the scheduling. Block 0 also writes offset[0..E]; each block sums its own
// offset[e] from received (E is small), so no block waits for another.
__global__ void rows_by_expert_kernel(int64_t* row_of_slot, int64_t* offset, const int32_t* expert,
                                      const uint8_t* kept, const int64_t* received, size_t slots,
                                      int E) {
  const int e = blockIdx.x;
  int64_t first = 0;
  for (int q = 0; q < e; ++q) first += received[q];
  if (e == 0) {
    for (int q = threadIdx.x; q <= E; q += blockDim.x) {
      int64_t o = 0;
      for (int r = 0; r < q; ++r) o += received[r];
      offset[q] = o;
    }
  }
  walk_slots(
      slots, [&](size_t i) { return expert[i] == e && kept[i] != 0; },
      [&](size_t i, bool mine, int64_t rank) {
        if (expert[i] == e) row_of_slot[i] = mine ? first + rank : -1;
      });
}

// ops.h moe_capacity_keep. One block per expert e: slot i of e is kept when preceding[e] plus its
// rank among e's slots is under the capacity (capacity < 0: always); thread 0 writes received[e]
// once the walk has counted e's slots. Each kept entry is written once, by its expert's block.
__global__ void capacity_keep_kernel(uint8_t* kept, int64_t* received, const int32_t* expert,
                                     const int64_t* preceding, long long capacity, size_t slots) {
  const int e = blockIdx.x;
  const int64_t earlier = preceding != nullptr ? preceding[e] : 0;
  const int64_t assigned = walk_slots(
      slots, [&](size_t i) { return expert[i] == e; },
      [&](size_t i, bool mine, int64_t rank) {
        if (mine) kept[i] = capacity < 0 || earlier + rank < capacity ? 1 : 0;
      });
  if (threadIdx.x == 0) {
    int64_t room = capacity < 0 ? assigned : capacity - earlier;
    if (room < 0) room = 0;
    received[e] = room < assigned ? room : assigned;
  }
}

}  // namespace loopmoe::model::ops::cuda::expert_rows
