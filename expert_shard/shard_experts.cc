#include "expert_shard/shard_experts.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "model/ops.h"
#include "runtime/collective_dispatcher.h"

namespace loopmoe::expert_shard {

ShardExperts::ShardExperts(comm::Communicator& world, int num_workers, int shard,
                           ExpertPartition partition, const model::ModelConfig& config)
    : world_(world),
      num_workers_(num_workers),
      shard_(shard),
      partition_(partition),
      shape_{config.d_model, config.expert_hidden},
      layers_(config.n_layers),
      local_(partition.size(shard)) {
  const size_t n = static_cast<size_t>(layers_) * local_ * shape_.params_per_expert();
  params_.assign(n, 0.f);
  grads_.assign(n, 0.f);
}

void ShardExperts::zero_grad() { std::memset(grads_.data(), 0, grads_.size() * sizeof(float)); }

size_t ShardExperts::w1_offset(int layer, int i) const {
  const size_t DF = static_cast<size_t>(shape_.d_model) * shape_.hidden;
  return static_cast<size_t>(layer) * local_ * 3 * DF + static_cast<size_t>(i) * DF;
}
size_t ShardExperts::w3_offset(int layer, int i) const {
  const size_t DF = static_cast<size_t>(shape_.d_model) * shape_.hidden;
  return w1_offset(layer, 0) + static_cast<size_t>(local_) * DF + static_cast<size_t>(i) * DF;
}
size_t ShardExperts::w2_offset(int layer, int i) const {
  const size_t DF = static_cast<size_t>(shape_.d_model) * shape_.hidden;
  return w1_offset(layer, 0) + 2 * static_cast<size_t>(local_) * DF + static_cast<size_t>(i) * DF;
}

model::ExpertWeights ShardExperts::weights(int layer) {
  const size_t a = w1_offset(layer, 0), b = w3_offset(layer, 0), c = w2_offset(layer, 0);
  return model::ExpertWeights{params_.data() + a, params_.data() + b, params_.data() + c,
                              grads_.data() + a,  grads_.data() + b,  grads_.data() + c};
}

std::vector<int64_t> ShardExperts::receive_header(int64_t tag, int application, int layer) {
  const int W = num_workers_, world = world_.size();
  const int64_t per_worker = 3 + local_;
  std::vector<int64_t> none(world, 0), counts(world, 0);
  for (int w = 0; w < W; ++w) counts[w] = per_worker;
  std::vector<int64_t> header(static_cast<size_t>(W) * per_worker);
  stats_.timed(0, [&] { world_.alltoallv(nullptr, none, header.data(), counts); });
  for (int w = 0; w < W; ++w) {
    const int64_t* h = header.data() + static_cast<size_t>(w) * per_worker;
    if (h[0] != tag || h[1] != application || h[2] != layer) {
      throw std::runtime_error("expert shard " + std::to_string(shard_) +
                               ": out of step with worker " + std::to_string(w) + ": expected " +
                               (tag == runtime::kForwardHeader ? "forward" : "backward") +
                               " of application " + std::to_string(application) + " (layer " +
                               std::to_string(layer) + "), got tag " + std::to_string(h[0]) +
                               " application " + std::to_string(h[1]) + " layer " +
                               std::to_string(h[2]));
    }
  }
  return header;
}

void ShardExperts::serve_forward(int application, int layer) {
  if (static_cast<int>(saved_.size()) <= application) saved_.resize(application + 1);
  Saved& sv = saved_[application];
  const int W = num_workers_, D = shape_.d_model, world = world_.size();
  const int64_t per_worker = 3 + local_;
  const std::vector<int64_t> header = receive_header(runtime::kForwardHeader, application, layer);
  auto rows_of = [&](int w, int e) { return header[static_cast<size_t>(w) * per_worker + 3 + e]; };
  // Workers send their rows grouped by expert; the batch groups them by expert, worker 0's rows
  // first: the order a single process would see them in (worker w holds the w-th slice of the
  // batch), which keeps expert weight gradients summed in the same order.
  sv.worker_rows.assign(W, 0);
  model::ExpertBatch& b = sv.batch;
  std::vector<int64_t> offset(local_ + 1, 0);
  for (int e = 0; e < local_; ++e) {
    int64_t n = 0;
    for (int w = 0; w < W; ++w) n += rows_of(w, e);
    offset[e + 1] = offset[e] + n;
  }
  for (int w = 0; w < W; ++w) {
    for (int e = 0; e < local_; ++e) sv.worker_rows[w] += rows_of(w, e);
  }
  model::copy_from_host(b.offset, offset.data(), offset.size());
  b.rows = offset[local_];
  const int64_t rows = b.rows;
  sv.recv_row_of.assign(rows, 0);
  {
    std::vector<int64_t> worker_start(W, 0);
    for (int w = 1; w < W; ++w) worker_start[w] = worker_start[w - 1] + sv.worker_rows[w - 1];
    int64_t row = 0;
    for (int e = 0; e < local_; ++e) {
      for (int w = 0; w < W; ++w) {
        int64_t src = worker_start[w];
        for (int f = 0; f < e; ++f) src += rows_of(w, f);
        for (int64_t r = 0; r < rows_of(w, e); ++r) sv.recv_row_of[row++] = src + r;
      }
    }
  }
  std::vector<int64_t> counts(world, 0), none(world, 0);
  for (int w = 0; w < W; ++w) counts[w] = sv.worker_rows[w] * D;
  recv_.resize(static_cast<size_t>(rows) * D);
  stats_.timed(0, [&] { world_.alltoallv(nullptr, none, recv_.data(), counts); });
  b.x.resize(recv_.size());
  model::ops::gather_rows(b.x.data(), recv_.data(), sv.recv_row_of.data(), rows, D);
  out_.resize(recv_.size());
  model::experts_forward(out_.data(), b, weights(layer), shape_);
  send_.resize(out_.size());
  model::ops::scatter_rows(send_.data(), out_.data(), sv.recv_row_of.data(), rows, D);
  stats_.timed(static_cast<int64_t>(send_.size() * sizeof(float)),
               [&] { world_.alltoallv(send_.data(), counts, nullptr, none); });
}

void ShardExperts::serve_backward(int application, int layer) {
  Saved& sv = saved_.at(application);
  const int W = num_workers_, D = shape_.d_model, world = world_.size();
  receive_header(runtime::kBackwardHeader, application, layer);
  const int64_t rows = sv.batch.rows;
  std::vector<int64_t> counts(world, 0), none(world, 0);
  for (int w = 0; w < W; ++w) counts[w] = sv.worker_rows[w] * D;
  recv_.resize(static_cast<size_t>(rows) * D);
  stats_.timed(0, [&] { world_.alltoallv(nullptr, none, recv_.data(), counts); });
  dy_.resize(recv_.size());
  dx_.resize(recv_.size());
  model::ops::gather_rows(dy_.data(), recv_.data(), sv.recv_row_of.data(), rows, D);
  model::experts_backward(dx_.data(), dy_.data(), sv.batch, weights(layer), shape_);
  send_.resize(dx_.size());
  model::ops::scatter_rows(send_.data(), dx_.data(), sv.recv_row_of.data(), rows, D);
  stats_.timed(static_cast<int64_t>(send_.size() * sizeof(float)),
               [&] { world_.alltoallv(send_.data(), counts, nullptr, none); });
}

}  // namespace loopmoe::expert_shard
