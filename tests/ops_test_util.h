// Shared helpers of the ops tests (test_ops_*.cc): random float inputs, bitwise comparison and
// random routings for the device seam's kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "model/ops.h"
#include "tests/grad_check.h"

namespace loopmoe::testing {

inline std::vector<float> random_floats(size_t n, uint64_t seed, double scale = 1.0) {
  const std::vector<double> d = random_vector(n, seed, scale);
  return std::vector<float>(d.begin(), d.end());
}

template <typename A, typename B>
bool same_bits(const A& a, const B& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(*a.data())) == 0;
}

// Softmax probabilities of S random rows (distinct values: no ties in the top-k).
inline std::vector<float> random_probs(int S, int E, uint64_t seed,
                                       std::vector<float>* lse = nullptr) {
  const std::vector<float> logits = random_floats(static_cast<size_t>(S) * E, seed, 3.0);
  std::vector<float> probs(logits.size()), l(S);
  model::ops::softmax_forward(probs.data(), l.data(), logits.data(), S, E);
  if (lse) *lse = l;
  return probs;
}

// A routing of S tokens to k slots with some slots dropped: row_of_slot in expert order.
inline std::vector<int64_t> random_row_of_slot(int S, int k, uint64_t seed, int64_t* rows) {
  std::mt19937_64 gen(seed);
  std::vector<int64_t> r(static_cast<size_t>(S) * k, -1);
  std::vector<size_t> kept;
  for (size_t i = 0; i < r.size(); ++i) {
    if (gen() % 4 != 0) kept.push_back(i);
  }
  std::vector<int64_t> order(kept.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::shuffle(order.begin(), order.end(), gen);
  for (size_t i = 0; i < kept.size(); ++i) r[kept[i]] = order[i];
  *rows = static_cast<int64_t>(kept.size());
  return r;
}

inline std::vector<uint8_t> kept_of(const std::vector<int64_t>& row_of_slot) {
  std::vector<uint8_t> kept(row_of_slot.size());
  for (size_t i = 0; i < kept.size(); ++i) kept[i] = row_of_slot[i] >= 0;
  return kept;
}

}  // namespace loopmoe::testing
