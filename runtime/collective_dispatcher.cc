#include "runtime/collective_dispatcher.h"

#include <algorithm>
#include <stdexcept>

namespace loopmoe::runtime {

CollectiveDispatcher::CollectiveDispatcher(comm::Communicator& world, comm::Communicator* workers,
                                           int num_workers, ExpertPartition partition, int d_model)
    : world_(world),
      workers_(workers),
      num_workers_(num_workers),
      partition_(partition),
      d_model_(d_model) {
  if (world.size() != num_workers + partition.num_shards()) {
    throw std::invalid_argument("world of " + std::to_string(world.size()) + " ranks is not " +
                                std::to_string(num_workers) + " workers + " +
                                std::to_string(partition.num_shards()) + " shards");
  }
  if (num_workers > 1 && (workers == nullptr || workers->size() != num_workers)) {
    throw std::invalid_argument("CollectiveDispatcher: the workers' communicator is missing");
  }
}

std::vector<int64_t> CollectiveDispatcher::elements(const std::vector<int64_t>& rows) const {
  std::vector<int64_t> n(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) n[i] = rows[i] * d_model_;
  return n;
}

void CollectiveDispatcher::send_header(int64_t tag, int application, int layer,
                                       const std::vector<int64_t>& expert_rows) {
  const int W = num_workers_;
  std::vector<int64_t> header, counts(world_.size(), 0), none(world_.size(), 0);
  for (int s = 0; s < partition_.num_shards(); ++s) {
    header.insert(header.end(), {tag, application, layer});
    if (!expert_rows.empty()) {
      header.insert(header.end(), expert_rows.begin() + partition_.begin(s),
                    expert_rows.begin() + partition_.end(s));
    } else {
      header.insert(header.end(), partition_.size(s), 0);
    }
    counts[W + s] = 3 + partition_.size(s);
  }
  stats_.timed(static_cast<int64_t>(header.size() * sizeof(int64_t)),
               [&] { world_.alltoallv(header.data(), counts, nullptr, none); });
}

void CollectiveDispatcher::round_trip(const Saved& sv) {
  const std::vector<int64_t> counts = elements(sv.row_counts), none(world_.size(), 0);
  stats_.timed(static_cast<int64_t>(send_.size() * sizeof(float)),
               [&] { world_.alltoallv(send_.data(), counts, nullptr, none); });
  recv_.resize(send_.size());
  stats_.timed(0, [&] { world_.alltoallv(nullptr, none, recv_.data(), counts); });
}

void CollectiveDispatcher::forward(int application, int layer, const model::RoutingPlan& plan,
                                   const float* x, float* out) {
  if (static_cast<int>(saved_.size()) <= application) saved_.resize(application + 1);
  Saved& sv = saved_[application];
  const int E = plan.num_experts, D = d_model_, W = num_workers_;
  // Grouped by expert is grouped by shard: shards own contiguous ranges.
  std::vector<int64_t> offset;
  model::group_rows_by_expert(plan, offset, sv.row_of_slot);
  sv.row_counts.assign(world_.size(), 0);
  for (int s = 0; s < partition_.num_shards(); ++s) {
    sv.row_counts[W + s] = offset[partition_.end(s)] - offset[partition_.begin(s)];
  }
  send_.resize(static_cast<size_t>(offset[E]) * D);
  model::gather_slot_rows(send_.data(), x, sv.row_of_slot, plan.top_k, D);
  send_header(kForwardHeader, application, layer, plan.received);
  round_trip(sv);
  model::scatter_slot_rows(out, recv_.data(), sv.row_of_slot, D);
}

void CollectiveDispatcher::backward(int application, int layer, const model::RoutingPlan& plan,
                                    const float* dout, float* dx) {
  const Saved& sv = saved_.at(application);
  const int D = d_model_;
  int64_t rows = 0;
  for (int64_t r : sv.row_counts) rows += r;
  send_.resize(static_cast<size_t>(rows) * D);
  model::gather_slot_rows(send_.data(), dout, sv.row_of_slot, 1, D);
  send_header(kBackwardHeader, application, layer, {});
  round_trip(sv);
  model::add_slot_rows_to_tokens(dx, recv_.data(), sv.row_of_slot, plan.num_tokens, plan.top_k, D);
}

void CollectiveDispatcher::reduce_batch_stats(model::RouterBatchStats& stats) {
  const int W = num_workers_;
  if (W == 1) return;
  const int E = static_cast<int>(stats.assigned.size());
  const int me = workers_->rank();
  // Row w: worker w's token count and assignments; summed, every worker sees every row.
  std::vector<int64_t> counts(static_cast<size_t>(W) * (E + 1), 0);
  counts[static_cast<size_t>(me) * (E + 1)] = stats.tokens;
  std::copy(stats.assigned.begin(), stats.assigned.end(),
            counts.begin() + static_cast<ptrdiff_t>(me) * (E + 1) + 1);
  workers_->allreduce_sum(counts.data(), counts.size());
  // Fixed-point sums (units, invalid) of the E probabilities and of lse^2: integers, so the
  // reduction gives the single process's sums bit for bit.
  std::vector<int64_t> sums;
  for (const model::ops::LossSum& s : stats.prob_sum) sums.insert(sums.end(), {s.units, s.invalid});
  sums.insert(sums.end(), {stats.lse_sq_sum.units, stats.lse_sq_sum.invalid});
  workers_->allreduce_sum(sums.data(), sums.size());

  stats.tokens = 0;
  std::fill(stats.assigned.begin(), stats.assigned.end(), 0);
  stats.preceding.assign(E, 0);
  for (int w = 0; w < W; ++w) {
    const int64_t* row = counts.data() + static_cast<size_t>(w) * (E + 1);
    stats.tokens += row[0];
    for (int e = 0; e < E; ++e) {
      stats.assigned[e] += row[1 + e];
      if (w < me) stats.preceding[e] += row[1 + e];
    }
  }
  for (int e = 0; e <= E; ++e) {
    model::ops::LossSum& s = e < E ? stats.prob_sum[e] : stats.lse_sq_sum;
    s.units = sums[2 * static_cast<size_t>(e)];
    s.invalid = sums[2 * static_cast<size_t>(e) + 1];
  }
}

}  // namespace loopmoe::runtime
