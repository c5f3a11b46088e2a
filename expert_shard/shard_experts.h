// The expert-shard side of the distributed MoE layer: the experts with global ids
// [partition.begin(s), partition.end(s)) of every unique layer, their gradients, and the serving
// half of the collective dispatcher's protocol (collective_dispatcher.h).
//
// Parameter buffer, per unique layer n: w1 [E_s, D, F], w3 [E_s, D, F], w2 [E_s, F, D] — the same
// per-expert blocks as the single-process layout, restricted to the owned experts.
#pragma once

#include <vector>

#include "comm/communicator.h"
#include "model/buffer.h"
#include "model/config.h"
#include "model/experts.h"
#include "runtime/comm_stats.h"
#include "runtime/expert_partition.h"

namespace loopmoe::expert_shard {

using runtime::AllToAllStats;
using runtime::ExpertPartition;

class ShardExperts {
 public:
  ShardExperts(comm::Communicator& world, int num_workers, int shard, ExpertPartition partition,
               const model::ModelConfig& config);

  int num_layers() const { return layers_; }
  int num_local_experts() const { return local_; }
  int first_expert() const { return partition_.begin(shard_); }
  size_t params_per_expert() const { return shape_.params_per_expert(); }
  size_t num_params() const { return params_.size(); }
  float* params() { return params_.data(); }
  const float* params() const { return params_.data(); }
  float* grads() { return grads_.data(); }
  void zero_grad();

  // Offsets of w1, w3, w2 of local expert i of layer n in the buffer, and their sizes.
  size_t w1_offset(int layer, int i) const;
  size_t w3_offset(int layer, int i) const;
  size_t w2_offset(int layer, int i) const;

  // One MoE application, in lockstep with the workers' CollectiveDispatcher calls. Throws
  // std::runtime_error naming the mismatch if a worker's header is for another application.
  void serve_forward(int application, int layer);
  void serve_backward(int application, int layer);

  AllToAllStats& stats() { return stats_; }

 private:
  struct Saved {
    model::ExpertBatch batch;
    std::vector<int64_t> worker_rows;  // [W] rows from each worker
    std::vector<int64_t> recv_row_of;  // [rows] batch row → row in the workers' order
  };
  std::vector<int64_t> receive_header(int64_t tag, int application, int layer);
  model::ExpertWeights weights(int layer);

  comm::Communicator& world_;
  int num_workers_, shard_;
  ExpertPartition partition_;
  model::ExpertShape shape_;
  int layers_, local_;
  std::vector<float> params_, grads_;
  std::vector<Saved> saved_;  // per application
  // Rows as the workers sent them / will receive them (communication staging, host memory), and
  // the experts' input is batch.x; their output and the backward's dy, dx in the batch's order.
  std::vector<float> recv_, send_;
  model::Buffer<float> out_, dy_, dx_;
  AllToAllStats stats_;
};

}  // namespace loopmoe::expert_shard
