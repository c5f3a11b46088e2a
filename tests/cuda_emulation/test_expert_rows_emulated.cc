// The routing's capacity walk and the dispatcher's expert-order layout on the device
// (model/cuda/expert_rows.cuh) under the CPU emulation of CUDA (cuda_emulation.h), against the
// CPU's moe_capacity_keep and moe_rows_by_expert: dropless, with capacity drops (with and without
// earlier slots of the batch) and with drops anywhere, an expert without slots, fewer slots than a
// block's threads and several rounds of them with a partial last one. On a GPU both run in
// CudaMoe.CapacityAndRowsByExpert and every CudaModel* test.
#include "tests/cuda_emulation/cuda_emulation.h"
// The emulation first: the kernel header uses what it defines.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <vector>

#include "model/cuda/expert_rows.cuh"
#include "model/ops.h"

namespace loopmoe::model {
namespace {

namespace er = ops::cuda::expert_rows;

// slots random choices among E experts (expert `empty` never chosen); each expert keeps its first
// `capacity` slots (0: all), and with `random_drops` every slot is also dropped with probability
// 1/4; offset is the running sum of the kept counts.
void check(size_t slots, int E, int empty, int64_t capacity, bool random_drops, uint64_t seed) {
  SCOPED_TRACE(testing::Message() << slots << " slots, E " << E << ", capacity " << capacity
                                  << (random_drops ? ", random drops" : ""));
  std::mt19937_64 gen(seed);
  std::vector<int32_t> expert(slots);
  std::vector<uint8_t> kept(slots);
  std::vector<int64_t> seen(E, 0), count(E, 0);
  for (size_t i = 0; i < slots; ++i) {
    do {
      expert[i] = static_cast<int32_t>(gen() % E);
    } while (expert[i] == empty);
    const int e = expert[i];
    kept[i] = (capacity == 0 || seen[e]++ < capacity) && !(random_drops && gen() % 4 == 0);
    count[e] += kept[i];
  }
  std::vector<int64_t> want(slots, -7), got(slots, -7);
  std::vector<int64_t> offset(E + 1, -7), got_offset(E + 1, -7);
  ops::moe_rows_by_expert(want.data(), offset.data(), expert.data(), kept.data(), count.data(),
                          slots, E);
  cuda_emulation::launch(er::rows_by_expert_kernel, dim3{static_cast<unsigned>(E), 1, 1},
                         er::kThreads, er::kSharedFloats, got.data(), got_offset.data(),
                         expert.data(), kept.data(), count.data(), slots, E);
  EXPECT_EQ(got_offset, offset);
  EXPECT_EQ(got, want);
  // The CPU's layout itself: every row once, each expert's rows in slot order.
  std::vector<int64_t> rows;
  for (int64_t r : want) {
    if (r >= 0) rows.push_back(r);
  }
  std::vector<int64_t> sorted = rows;
  std::sort(sorted.begin(), sorted.end());
  ASSERT_EQ(static_cast<int64_t>(sorted.size()), offset[E]);
  for (size_t i = 0; i < sorted.size(); ++i) EXPECT_EQ(sorted[i], static_cast<int64_t>(i));
}

// The capacity walk of `slots` random choices (expert `empty` never chosen), preceding[e] slots of
// each expert earlier in the batch or none.
void check_capacity(size_t slots, int E, int empty, int64_t capacity, bool with_preceding,
                    uint64_t seed) {
  SCOPED_TRACE(testing::Message() << slots << " slots, E " << E << ", capacity " << capacity
                                  << (with_preceding ? ", preceding" : ""));
  std::mt19937_64 gen(seed);
  std::vector<int32_t> expert(slots);
  for (int32_t& e : expert) {
    do {
      e = static_cast<int32_t>(gen() % E);
    } while (e == empty);
  }
  std::vector<int64_t> preceding(E);
  for (int64_t& p : preceding) p = static_cast<int64_t>(gen() % 150);
  const int64_t* pre = with_preceding ? preceding.data() : nullptr;
  std::vector<uint8_t> want(slots, 7), got(slots, 7);
  std::vector<int64_t> want_received(E, -7), got_received(E, -7);
  ops::moe_capacity_keep(want.data(), want_received.data(), expert.data(), pre, capacity, slots, E);
  cuda_emulation::launch(er::capacity_keep_kernel, dim3{static_cast<unsigned>(E), 1, 1},
                         er::kThreads, er::kSharedFloats, got.data(), got_received.data(),
                         expert.data(), pre, static_cast<long long>(capacity), slots);
  EXPECT_EQ(got, want);
  EXPECT_EQ(got_received, want_received);
  const int64_t kept = std::count(want.begin(), want.end(), 1);
  if (capacity < 0) {
    EXPECT_EQ(kept, static_cast<int64_t>(slots));
  } else if (capacity < static_cast<int64_t>(slots) / E) {
    EXPECT_LT(kept, static_cast<int64_t>(slots));
  }
}

TEST(ExpertRowsEmulated, CapacityMatchesTheCpu) {
  check_capacity(100, 5, 2, -1, false, 1);    // fewer slots than threads, dropless
  check_capacity(1000, 7, 3, 100, false, 2);  // several rounds, the last partial, drops
  check_capacity(1000, 7, 3, 100, true, 3);   // and earlier slots of the batch
  check_capacity(512, 4, -1, 0, true, 4);     // capacity 0: nothing kept
  check_capacity(1000, 7, 0, 5000, true, 5);  // room for all
}

TEST(ExpertRowsEmulated, MatchTheCpu) {
  check(100, 5, 2, 0, false, 1);     // fewer slots than threads, dropless
  check(1000, 7, 3, 0, false, 2);    // several rounds, the last partial
  check(1000, 7, 0, 100, false, 3);  // capacity drops (each expert ~167 slots)
  check(512, 4, -1, 90, false, 4);   // whole rounds only
  check(1000, 7, 3, 0, true, 5);     // drops anywhere
}

}  // namespace
}  // namespace loopmoe::model
