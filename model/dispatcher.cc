// Row bookkeeping every dispatcher shares: the expert-order layout of a plan's kept slots (host),
// and the row movements, which are the dispatch kernels of ops.h.
#include "model/dispatcher.h"

#include "model/ops.h"

namespace loopmoe::model {

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
  ops::moe_permute_forward(rows, src, row_of_slot.data(), row_of_slot.size(), per_row, D);
}

void scatter_slot_rows(float* out, const float* rows, const std::vector<int64_t>& row_of_slot,
                       int D) {
  ops::moe_unpermute_forward(out, rows, row_of_slot.data(), row_of_slot.size(), D);
}

void add_slot_rows_to_tokens(float* dx, const float* rows, const std::vector<int64_t>& row_of_slot,
                             int S, int k, int D) {
  ops::moe_permute_backward(dx, rows, row_of_slot.data(), S, k, D);
}

}  // namespace loopmoe::model
