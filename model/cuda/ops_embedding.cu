// ops.h on CUDA, part 2b: the token embedding. Its own file because the backward sorts with CUB
// (a heavy include). Mirrors the embedding of model/cpu/ops_dense.cc.
#include <algorithm>
#include <cub/cub.cuh>

#include "model/cuda/cuda_util.cuh"
#include "model/cuda/ops_cuda.h"

namespace loopmoe::model::ops::cuda {

template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* wte, int S, int D) {
  kernel_util::for_each_index(static_cast<size_t>(S) * D, [=] __device__(size_t idx) {
    const size_t s = idx / D, i = idx % D;
    out[idx] = wte[static_cast<size_t>(tokens[s]) * D + i];
  });
}

namespace {

// Block (run, column block): the rows of one distinct token, one thread per column, added to
// that token's row of dwte in increasing row order (acc = dwte; acc += dout[r] for each row r).
// That is the CPU's serial loop's order for every element, so the result is its bits exactly,
// and no two threads write the same element (no atomics).
template <typename T>
__global__ void embedding_backward_runs_kernel(T* dwte, const T* dout, const int32_t* run_token,
                                               const int32_t* run_start, const int32_t* run_length,
                                               const int32_t* sorted_rows, const int* runs, int D) {
  const int run = blockIdx.x;
  if (run >= *runs) return;
  const int i = blockIdx.y * blockDim.x + threadIdx.x;
  if (i >= D) return;
  T* row = dwte + static_cast<size_t>(run_token[run]) * D;
  T acc = row[i];
  const int begin = run_start[run], end = begin + run_length[run];
  for (int r = begin; r < end; ++r) acc += dout[static_cast<size_t>(sorted_rows[r]) * D + i];
  row[i] = acc;
}

// Bump allocation of aligned pieces of the shared workspace.
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}
  // The next `count` values of U, 256-byte aligned (nullptr while only sizing: base == nullptr).
  template <typename U>
  U* take(size_t count) {
    U* p = base_ != nullptr ? reinterpret_cast<U*>(base_ + used_) : nullptr;
    used_ += (count * sizeof(U) + 255) / 256 * 256;
    return p;
  }
  size_t used() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

}  // namespace

template <typename T>
void embedding_backward(T* dwte, const T* dout, const int32_t* tokens, int S, int D) {
  if (S <= 0 || D <= 0) return;
  // Group the rows by token: a stable radix sort of (token, row) pairs (LSD radix sort keeps the
  // rows of one token in increasing order), run-length encoding of the sorted tokens (the distinct
  // tokens, their row counts, how many), and an exclusive scan of the counts (each run's start).
  // All deterministic; then one block per (run, column block) adds the rows.
  size_t sort_bytes = 0, encode_bytes = 0, scan_bytes = 0;
  LOOPMOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, sort_bytes, static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), S));
  LOOPMOE_CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(
      nullptr, encode_bytes, static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
      static_cast<int32_t*>(nullptr), static_cast<int*>(nullptr), S));
  LOOPMOE_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes,
                                                   static_cast<const int32_t*>(nullptr),
                                                   static_cast<int32_t*>(nullptr), S));
  const size_t temp_bytes = std::max(sort_bytes, std::max(encode_bytes, scan_bytes));
  // Sizes first (a Carver over no memory), then the same carving over the workspace.
  const auto carve = [&](Carver& c) {
    struct Pieces {
      int32_t *rows, *sorted_tokens, *sorted_rows, *run_token, *run_length, *run_start;
      int* runs;
      void* temp;
    } p;
    p.rows = c.take<int32_t>(S);
    p.sorted_tokens = c.take<int32_t>(S);
    p.sorted_rows = c.take<int32_t>(S);
    p.run_token = c.take<int32_t>(S);
    p.run_length = c.take<int32_t>(S);
    p.run_start = c.take<int32_t>(S);
    p.runs = c.take<int>(1);
    p.temp = c.take<char>(temp_bytes);
    return p;
  };
  Carver sizing(nullptr);
  carve(sizing);
  Carver carver(static_cast<char*>(kernel_util::workspace(sizing.used())));
  const auto p = carve(carver);

  int32_t* rows = p.rows;
  kernel_util::for_each_index(static_cast<size_t>(S),
                              [=] __device__(size_t s) { rows[s] = static_cast<int32_t>(s); });
  size_t bytes = sort_bytes;
  LOOPMOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(p.temp, bytes, tokens, p.sorted_tokens, p.rows,
                                                     p.sorted_rows, S));
  bytes = encode_bytes;
  LOOPMOE_CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(p.temp, bytes, p.sorted_tokens, p.run_token,
                                                        p.run_length, p.runs, S));
  bytes = scan_bytes;
  LOOPMOE_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(p.temp, bytes, p.run_length, p.run_start, S));
  // S blocks bound the number of runs; those past *runs return at once.
  const dim3 grid(static_cast<unsigned>(S),
                  static_cast<unsigned>((D + kernel_util::kThreads - 1) / kernel_util::kThreads));
  embedding_backward_runs_kernel<<<grid, kernel_util::kThreads>>>(
      dwte, dout, p.run_token, p.run_start, p.run_length, p.sorted_rows, p.runs, D);
  LOOPMOE_CUDA_CHECK_LAUNCH();
}

template <typename T>
void embedding_backward(const GradGroups<T>& dwte, const T* dout, const int32_t* tokens, int D) {
  for (int g = 0; g < dwte.groups; ++g) {
    const int r0 = dwte.row_begin(g);
    cuda::embedding_backward(dwte.at(g), dout + static_cast<size_t>(r0) * D, tokens + r0,
                             dwte.row_end(g) - r0, D);
  }
}

// This file's entries of model/ops_list.h.
LOOPMOE_OPS_EMBEDDING(LOOPMOE_OPS_INSTANTIATE, float)

}  // namespace loopmoe::model::ops::cuda
