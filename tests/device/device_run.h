// A ten-step AdamW run of a tiny configuration on a chosen device, everything it produces copied
// to the host: shared by the device-seam tests (tests/device/, the emulated device against the
// CPU, bit for bit) and the GPU tests (tests/cuda/test_cuda_model.cc, CUDA against the CPU).
// Needs LOOPMOE_SOURCE_DIR (the configs).
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <ostream>
#include <string>
#include <vector>

#include "model/buffer.h"
#include "model/config.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "model/rng.h"
#include "model/train_step.h"

namespace loopmoe::device_testing {

using model::Device;

// Sets the default device for a scope (tests share the process-wide setting).
class DeviceScope {
 public:
  explicit DeviceScope(Device device) : previous_(model::default_device()) {
    model::set_default_device(device);
  }
  ~DeviceScope() { model::set_default_device(previous_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  Device previous_;
};

struct Variant {
  std::string name;
  std::string config;  // file under configs/
  model::IterAdaLNMode mode;
  double capacity_factor;  // 0: dropless
  int grad_groups;
};

inline void PrintTo(const Variant& v, std::ostream* os) { *os << v.name; }

inline model::Config variant_config(const Variant& v) {
  model::Config c = model::load_config(std::string(LOOPMOE_SOURCE_DIR) + "/configs/" + v.config);
  c.model.iter_adaln = v.mode;
  c.model.capacity_factor = v.capacity_factor;
  // The tiny model as configured, on a shorter batch so that 2 × 8 runs of ten steps stay quick.
  c.model.seq_len = 32;
  c.train.batch_size = 4;
  c.train.grad_groups = v.grad_groups;
  c.train.warmup_steps = 2;
  c.train.steps = 10;
  return c;
}

inline std::vector<int32_t> random_tokens(size_t n, int vocab, uint64_t seed) {
  model::Rng rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng.next_u64() % vocab);
  return t;
}

// Everything a run produces, on the host.
struct RunResult {
  std::vector<double> losses;  // per step: total, ce, aux, z, dropped, grad_norm
  std::vector<float> first_grads, grads, params, m, v, logits, lens, halted_logits;
  std::vector<int> iterations_used;
};

constexpr int kSteps = 10;

inline RunResult train(const model::Config& cfg, Device device) {
  // One thread: the comparison needs no more, and a shared machine's oversubscribed OpenMP
  // barriers would make it slow.
  model::set_num_threads(1);
  DeviceScope scope(device);
  const int B = cfg.train.batch_size, T = cfg.model.seq_len, S = B * T;
  model::Model m(cfg.model);
  EXPECT_EQ(m.device(), device);
  m.set_grad_groups(cfg.train.grad_groups);
  model::AdamW adam(m.layout(), cfg.train);
  m.init_params(cfg.train.seed);
  const model::FinishGradients finish = model::clip_locally(m.num_params(), cfg.train.grad_clip);
  RunResult r;
  // One batch, every step: the loss must then fall (a run that trains), which random batches of
  // random tokens would not show in ten steps.
  const std::vector<int32_t> tokens = random_tokens(S, cfg.model.vocab_size, 100);
  const std::vector<int32_t> targets = random_tokens(S, cfg.model.vocab_size, 200);
  for (int step = 0; step < kSteps; ++step) {
    const model::StepOutcome out =
        model::train_step(m, adam, cfg.train, step, {tokens.data(), targets.data(), B, T}, finish);
    EXPECT_FALSE(out.nonfinite);
    r.losses.insert(r.losses.end(), {out.loss.total, out.loss.ce, out.loss.aux, out.loss.z,
                                     static_cast<double>(out.loss.dropped), out.grad_norm});
    if (step == 0) r.first_grads = m.grads_to_host();
  }
  r.grads = m.grads_to_host();  // the last step's, clipped
  r.params = m.params_to_host();
  r.m = adam.m_buffer().to_host();
  r.v = adam.v_buffer().to_host();
  // Evaluation paths: a forward without targets (logits), the logit lens, adaptive halting.
  m.forward(tokens.data(), nullptr, B, T);
  r.logits = m.logits_to_host();
  m.forward(tokens.data(), targets.data(), B, T);
  for (int it = 0; it < cfg.model.n_loops; ++it) {
    r.lens.push_back(static_cast<float>(m.decode_loss(m.iteration_state(it), targets.data(), S)));
    const std::vector<float> state = m.iteration_state_to_host(it);
    r.lens.push_back(state.empty() ? 0.f : state[state.size() / 2]);
  }
  model::ForwardOptions halt;
  halt.halt_threshold = 0.05;
  m.set_keep_logits(true);  // the training steps above ran the head in place
  m.forward(tokens.data(), targets.data(), B, T, halt);
  r.halted_logits = m.logits_to_host();
  r.iterations_used = m.iterations_used();
  return r;
}

template <typename V>
inline bool same_bits(const V& a, const V& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0])) == 0);
}

// The variants every device test runs: both tiny configurations, every IterAdaLN mode, dropless
// and capacity routing, one and two gradient groups.
inline std::vector<Variant> tiny_variants() {
  return {
      {"vanilla_dropless", "vanilla_tiny.toml", model::IterAdaLNMode::kOff, 0.0, 1},
      {"vanilla_capacity", "vanilla_tiny.toml", model::IterAdaLNMode::kOff, 1.0, 2},
      {"loopmoe_off_dropless", "loopmoe_tiny.toml", model::IterAdaLNMode::kOff, 0.0, 1},
      {"loopmoe_joint_dropless", "loopmoe_tiny.toml", model::IterAdaLNMode::kJoint, 0.0, 1},
      {"loopmoe_joint_capacity", "loopmoe_tiny.toml", model::IterAdaLNMode::kJoint, 1.0, 2},
      {"loopmoe_iter_dropless", "loopmoe_tiny.toml", model::IterAdaLNMode::kIter, 0.0, 2},
      {"loopmoe_iter_capacity", "loopmoe_tiny.toml", model::IterAdaLNMode::kIter, 1.0, 1},
      {"loopmoe_token_dropless", "loopmoe_tiny.toml", model::IterAdaLNMode::kToken, 0.0, 1},
      {"loopmoe_token_capacity", "loopmoe_tiny.toml", model::IterAdaLNMode::kToken, 1.0, 2},
  };
}

}  // namespace loopmoe::device_testing
