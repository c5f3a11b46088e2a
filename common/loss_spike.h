// The numerics guard's shared pieces (docs/CONFIG.md): the rollback limit and the loss-spike
// check (train.loss_spike_factor / loss_spike_window), shared by the single-process trainer and
// the coordinator's job driver so that a job flags the same steps as `loopmoe train` on the same
// curve.
#pragma once

#include <algorithm>
#include <cstddef>
#include <deque>
#include <optional>
#include <vector>

namespace loopmoe::common {

// train.nonfinite = "rollback": more rollbacks than this in one run stop it (the trainer) or fail
// the job (the job driver): the fault is not going away.
inline constexpr int kMaxRollbacks = 10;

class LossSpikeCheck {
 public:
  // factor 0: off (observe() never reports). Otherwise a loss above factor × the median of the
  // previous `window` losses is a spike.
  LossSpikeCheck(double factor, int window) : factor_(factor), window_(window) {}

  // Records `loss`; returns the running median it exceeded by more than factor × when it is a
  // spike (checked only once `window` earlier losses are known).
  std::optional<double> observe(double loss) {
    if (factor_ <= 0) return std::nullopt;
    std::optional<double> spike;
    if (static_cast<int>(recent_.size()) == window_) {
      const double med = median();
      if (loss > factor_ * med) spike = med;
      recent_.pop_front();
    }
    recent_.push_back(loss);
    return spike;
  }
  // Forget the window (after a rollback: the replayed steps refill it).
  void clear() { recent_.clear(); }

 private:
  double median() const {
    std::vector<double> v(recent_.begin(), recent_.end());
    const auto mid = v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2);
    std::nth_element(v.begin(), mid, v.end());
    if (v.size() % 2 == 1) return *mid;
    return 0.5 * (*mid + *std::max_element(v.begin(), mid));
  }

  double factor_;
  int window_;
  std::deque<double> recent_;
};

}  // namespace loopmoe::common
