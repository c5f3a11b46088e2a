// The worker side of the distributed MoE layer: the only piece of a worker that moves tokens.
// Token rows go to the expert shards that own their experts by all-to-all (dispatch), expert
// outputs come back the same way (combine); backward mirrors it. Batch statistics of the router
// are reduced over the workers, so that every worker routes as one process holding the whole
// global batch would (DESIGN.md §2).
//
// World ranks: workers 0..W-1, then shards W..W+S-1. Per MoE application, forward: (1) int64
// header to every shard: [tag, application, layer, rows per owned expert...], (2) rows, (3) results
// back. Backward: (1) header, (2) output gradients, (3) input gradients back. The headers let a
// shard detect a peer out of step instead of exchanging mismatched sizes.
#pragma once

#include <vector>

#include "comm/communicator.h"
#include "model/dispatcher.h"
#include "runtime/comm_stats.h"
#include "runtime/expert_partition.h"

namespace loopmoe::runtime {

// Tag of a header: forward and backward headers differ so a shard cannot confuse them.
constexpr int64_t kForwardHeader = 1, kBackwardHeader = 2;

class CollectiveDispatcher final : public model::Dispatcher {
 public:
  // `workers` spans the W workers (may be null when W == 1). Neither is owned.
  CollectiveDispatcher(comm::Communicator& world, comm::Communicator* workers, int num_workers,
                       ExpertPartition partition, int d_model);

  void forward(int application, int layer, const model::RoutingPlan& plan, const float* x,
               float* out) override;
  void backward(int application, int layer, const model::RoutingPlan& plan, const float* dout,
                float* dx) override;
  void reduce_batch_stats(model::RouterBatchStats& stats) override;

  AllToAllStats& stats() { return stats_; }

 private:
  struct Saved {
    std::vector<int64_t> row_of_slot;  // [S*k] row in the send buffer, -1 when dropped
    std::vector<int64_t> row_counts;   // [world] rows sent to each rank
  };
  // Sends [tag, application, layer, rows of each of shard s's experts] to every shard s (zeros
  // in backward: the shard knows them from forward).
  void send_header(int64_t tag, int application, int layer,
                   const std::vector<int64_t>& expert_rows);
  // send_ to the shards (sv.row_counts rows each), their answer into recv_.
  void round_trip(const Saved& sv);
  // Rows [world] → element counts.
  std::vector<int64_t> elements(const std::vector<int64_t>& rows) const;

  comm::Communicator& world_;
  comm::Communicator* workers_;
  int num_workers_;
  ExpertPartition partition_;
  int d_model_;
  std::vector<Saved> saved_;  // per application
  std::vector<float> send_, recv_;
  AllToAllStats stats_;
};

}  // namespace loopmoe::runtime
