#include "model/dispatcher.h"

#include <algorithm>

namespace loopmoe {

void group_rows_by_expert(const RoutingPlan& plan, std::vector<int64_t>& offset,
                          std::vector<int64_t>& row_of_slot) {
  const int E = plan.num_experts;
  offset.assign(E + 1, 0);
  for (int e = 0; e < E; ++e) offset[e + 1] = offset[e] + plan.received[e];
  std::vector<int64_t> cursor(offset.begin(), offset.end() - 1);
  row_of_slot.assign(plan.expert.size(), -1);
  for (size_t i = 0; i < plan.expert.size(); ++i) {
    if (plan.kept[i]) row_of_slot[i] = cursor[plan.expert[i]]++;
  }
}

void gather_slot_rows(float* rows, const float* src, const std::vector<int64_t>& row_of_slot,
                      int per_row, int D) {
  const size_t slots = row_of_slot.size();
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < slots; ++i) {
    if (row_of_slot[i] >= 0) {
      std::copy_n(src + (i / per_row) * D, D, rows + row_of_slot[i] * D);
    }
  }
}

void scatter_slot_rows(float* out, const float* rows, const std::vector<int64_t>& row_of_slot,
                       int D) {
  const size_t slots = row_of_slot.size();
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < slots; ++i) {
    float* o = out + i * D;
    if (row_of_slot[i] >= 0) {
      std::copy_n(rows + row_of_slot[i] * D, D, o);
    } else {
      std::fill_n(o, D, 0.f);
    }
  }
}

void add_slot_rows_to_tokens(float* dx, const float* rows, const std::vector<int64_t>& row_of_slot,
                             int S, int k, int D) {
#pragma omp parallel for schedule(static)
  for (int t = 0; t < S; ++t) {
    float* d = dx + static_cast<size_t>(t) * D;
    for (int j = 0; j < k; ++j) {
      const int64_t r = row_of_slot[static_cast<size_t>(t) * k + j];
      if (r < 0) continue;
      const float* g = rows + r * D;
      for (int i = 0; i < D; ++i) d[i] += g[i];
    }
  }
}

}  // namespace loopmoe
