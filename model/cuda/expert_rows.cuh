// The expert-order rows of a routing's kept slots on the device (ops.h moe_rows_by_expert): the
// dispatcher's layout without the host loop over the slots and the copy of its result. In a header
// of its own, like flash_attention.cuh, so that it also runs under tests/cuda_emulation/ against
// the CPU's moe_rows_by_expert where no GPU is present: no CUDA API call here, the shared memory
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

// One block per expert e: it walks the slots in order, kThreads at a time, and gives each kept
// slot of e its rank r among e's kept slots by a block-wide scan of "is a kept slot of e"
// (Hillis–Steele over shared memory, double-buffered) plus the count of the earlier rounds; a
// dropped slot of e gets −1. Every slot belongs to exactly one expert, so each row_of_slot entry
// is written once, by its expert's block; no atomics, the same result whatever the scheduling.
// offset: device [E + 1].
__global__ void rows_by_expert_kernel(int64_t* row_of_slot, const int32_t* expert,
                                      const uint8_t* kept, const int64_t* offset, size_t slots) {
  LOOPMOE_DYNAMIC_SHARED(smem);
  int* scan[2] = {reinterpret_cast<int*>(smem), reinterpret_cast<int*>(smem) + kThreads};
  const int e = blockIdx.x, j = threadIdx.x;
  const int64_t first = offset[e];
  int64_t before = 0;  // kept slots of e in the earlier rounds
  for (size_t base = 0; base < slots; base += kThreads) {
    const size_t i = base + j;
    const bool of_e = i < slots && expert[i] == e;
    const int mine = of_e && kept[i] ? 1 : 0;
    int in = 0;
    scan[in][j] = mine;
    __syncthreads();
    for (int step = 1; step < kThreads; step *= 2) {  // inclusive scan
      scan[1 - in][j] = scan[in][j] + (j >= step ? scan[in][j - step] : 0);
      in = 1 - in;
      __syncthreads();
    }
    if (of_e) row_of_slot[i] = mine ? first + before + scan[in][j] - 1 : -1;
    before += scan[in][kThreads - 1];
    __syncthreads();  // every thread has read the total before the next round writes
  }
}

}  // namespace loopmoe::model::ops::cuda::expert_rows
