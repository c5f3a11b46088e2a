// Finite-difference gradient checking for the double instantiation of the kernels.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace loopmoe::testing {

inline std::vector<double> random_vector(size_t n, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(-scale, scale);
  std::vector<double> v(n);
  for (double& x : v) x = dist(gen);
  return v;
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Compares analytic[i] with the central difference of loss() in x[i], on up to max_checks
// entries. Tolerance is relative to max(1e-3, |numeric|, |analytic|).
inline void expect_gradient(std::vector<double>& x, const std::vector<double>& analytic,
                            const std::function<double()>& loss, const std::string& name,
                            double tol = 1e-6, size_t max_checks = 300) {
  ASSERT_EQ(x.size(), analytic.size()) << name;
  std::mt19937_64 gen(42);
  std::vector<size_t> idx(x.size());
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
  if (idx.size() > max_checks) {
    std::shuffle(idx.begin(), idx.end(), gen);
    idx.resize(max_checks);
  }
  const double h = 1e-6;
  double worst = 0;
  for (size_t i : idx) {
    const double saved = x[i];
    x[i] = saved + h;
    const double lp = loss();
    x[i] = saved - h;
    const double lm = loss();
    x[i] = saved;
    const double num = (lp - lm) / (2 * h);
    const double err =
        std::abs(num - analytic[i]) / std::max({1e-3, std::abs(num), std::abs(analytic[i])});
    worst = std::max(worst, err);
    if (err > tol) {
      ADD_FAILURE() << name << "[" << i << "]: analytic " << analytic[i] << " numeric " << num;
      return;
    }
  }
  SUCCEED() << name << " worst relative error " << worst;
}

}  // namespace loopmoe::testing
