// The device seam, checked without a GPU: the tiny configurations trained for ten AdamW steps on
// the host-emulated device (Device::kHostAsDevice: host memory that Buffer treats as device
// memory, CPU kernels that the ops.h dispatcher runs only on pointers into such buffers) must give
// the plain CPU run's losses, logits, gradients, parameters and AdamW moments bit for bit. Any
// host read of model memory other than an explicit copy throws there (Buffer's host accessors,
// FlatBuffer::host, the dispatcher's pointer check), so a pass means the model would reach a real
// GPU's memory only through copies too. Also: the guards themselves, and a checkpoint written on
// one device loading on the other.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "model/buffer.h"
#include "model/config.h"
#include "model/model.h"
#include "model/ops.h"
#include "model/optimizer.h"
#include "model/rng.h"
#include "model/train_step.h"
#include "tests/device/device_run.h"
#include "tests/tiny_run.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace loopmoe {
namespace {

using device_testing::DeviceScope;
using device_testing::kSteps;
using device_testing::random_tokens;
using device_testing::RunResult;
using device_testing::same_bits;
using device_testing::train;
using device_testing::Variant;
using device_testing::variant_config;
using model::Device;

class HostAsDevice : public ::testing::TestWithParam<Variant> {};

TEST_P(HostAsDevice, TrainsBitIdenticalToTheCpu) {
  const model::Config cfg = variant_config(GetParam());
  const RunResult cpu = train(cfg, Device::kCpu);
  const RunResult dev = train(cfg, Device::kHostAsDevice);
  ASSERT_EQ(cpu.losses.size(), static_cast<size_t>(6 * kSteps));
  for (size_t i = 0; i < cpu.losses.size(); ++i) {
    EXPECT_EQ(std::memcmp(&cpu.losses[i], &dev.losses[i], sizeof(double)), 0)
        << "step " << i / 6 << " quantity " << i % 6 << ": " << cpu.losses[i] << " vs "
        << dev.losses[i];
  }
  EXPECT_TRUE(same_bits(cpu.first_grads, dev.first_grads)) << "step 0 gradients";
  EXPECT_TRUE(same_bits(cpu.grads, dev.grads)) << "last gradients";
  EXPECT_TRUE(same_bits(cpu.params, dev.params)) << "parameters";
  EXPECT_TRUE(same_bits(cpu.m, dev.m)) << "AdamW m";
  EXPECT_TRUE(same_bits(cpu.v, dev.v)) << "AdamW v";
  EXPECT_TRUE(same_bits(cpu.logits, dev.logits)) << "logits";
  EXPECT_TRUE(same_bits(cpu.lens, dev.lens)) << "logit lens";
  EXPECT_TRUE(same_bits(cpu.halted_logits, dev.halted_logits)) << "halted logits";
  EXPECT_EQ(cpu.iterations_used, dev.iterations_used);
  // The run did train (not a vacuous comparison of zeros).
  EXPECT_LT(cpu.losses[6 * (kSteps - 1)], cpu.losses[0]);
  if (GetParam().capacity_factor > 0) {  // capacity routing did drop slots
    double dropped = 0;
    for (int step = 0; step < kSteps; ++step) dropped += cpu.losses[6 * step + 4];
    EXPECT_GT(dropped, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(TinyConfigs, HostAsDevice,
                         ::testing::ValuesIn(device_testing::tiny_variants()),
                         [](const ::testing::TestParamInfo<Variant>& info) {
                           return info.param.name;
                         });

// The guards the bit-identity test relies on.
TEST(HostAsDeviceGuards, HostAccessorsThrowOnTheEmulatedDevice) {
  model::Buffer<float> host(4);
  EXPECT_NO_THROW(host[0] = 1.f);
  model::Buffer<float> dev(4, Device::kHostAsDevice);
  EXPECT_THROW(dev[0], std::logic_error);
  EXPECT_THROW(dev.begin(), std::logic_error);
  EXPECT_THROW(dev.end(), std::logic_error);
  EXPECT_THROW(dev.host_vector(), std::logic_error);
  const float one = 1.f;
  model::copy_from_host(dev, &one, 1);
  EXPECT_EQ(model::copy_to_host(dev), std::vector<float>{1.f});
}

TEST(HostAsDeviceGuards, KernelsRefuseHostPointers) {
  DeviceScope scope(Device::kHostAsDevice);
  model::Buffer<float> x(8), y(8);
  EXPECT_NO_THROW(model::ops::silu_forward(y.data(), x.data(), 8));
  std::vector<float> host(8);
  EXPECT_THROW(model::ops::silu_forward(y.data(), host.data(), 8), std::logic_error);
  EXPECT_THROW(model::ops::silu_forward(host.data(), x.data(), 8), std::logic_error);
}

TEST(HostAsDeviceGuards, ModelStaysOnItsDevice) {
  model::Config cfg =
      variant_config({"guard", "vanilla_tiny.toml", model::IterAdaLNMode::kOff, 0.0, 1});
  std::unique_ptr<model::Model> m;
  std::unique_ptr<model::AdamW> adam;
  {
    DeviceScope scope(Device::kHostAsDevice);
    m = std::make_unique<model::Model>(cfg.model);
    adam = std::make_unique<model::AdamW>(m->layout(), cfg.train);
    m->init_params(1);
    EXPECT_THROW(m->logits(), std::logic_error);  // the host view is for CPU models only
    EXPECT_THROW(adam->m(), std::logic_error);
  }
  const std::vector<int32_t> tokens(8, 1);
  EXPECT_THROW(m->forward(tokens.data(), tokens.data(), 1, 8), std::logic_error);
  EXPECT_THROW(m->zero_grad(), std::logic_error);
  EXPECT_THROW(adam->step(m->params(), m->grads(), 1e-3), std::logic_error);
}

// A checkpoint written on one device loads on the other, with the same bits.
TEST(HostAsDeviceGuards, CheckpointsMoveBetweenDevices) {
  model::set_num_threads(1);
  const model::Config cfg =
      variant_config({"ckpt", "loopmoe_tiny.toml", model::IterAdaLNMode::kJoint, 0.0, 1});
  const std::string dir = ::testing::TempDir() + "/loopmoe_device_ckpt";
  std::filesystem::create_directories(dir);
  const int B = cfg.train.batch_size, T = cfg.model.seq_len;
  const auto tokens = random_tokens(B * T, cfg.model.vocab_size, 5);
  for (const Device from : {Device::kHostAsDevice, Device::kCpu}) {
    const Device to = from == Device::kCpu ? Device::kHostAsDevice : Device::kCpu;
    const std::string path = dir + "/" + model::to_string(from) + ".ckpt";
    std::vector<float> params, m, v;
    {
      DeviceScope scope(from);
      model::Model model(cfg.model);
      model::AdamW adam(model.layout(), cfg.train);
      model.init_params(7);
      model::train_step(model, adam, cfg.train, 0, {tokens.data(), tokens.data(), B, T},
                        model::clip_locally(model.num_params(), cfg.train.grad_clip));
      train::save_checkpoint(path, cfg, model, adam, {1, {}, 1});
      params = model.params_to_host();
      m = adam.m_buffer().to_host();
      v = adam.v_buffer().to_host();
    }
    DeviceScope scope(to);
    model::Model model(cfg.model);
    model::AdamW adam(model.layout(), cfg.train);
    train::load_checkpoint(path, cfg, model, adam);
    EXPECT_TRUE(same_bits(model.params_to_host(), params)) << model::to_string(from);
    EXPECT_TRUE(same_bits(adam.m_buffer().to_host(), m));
    EXPECT_TRUE(same_bits(adam.v_buffer().to_host(), v));
    EXPECT_EQ(adam.steps_taken(), 1);
  }
  std::filesystem::remove_all(dir);
}

// The trainer end to end (checkpoints every 4 steps, validation, a stop and a resume) on the
// emulated device: the CPU's losses and checkpoint file, byte for byte.
TEST(HostAsDeviceTrainer, RunTrainingMatchesTheCpu) {
  namespace fs = std::filesystem;
  const fs::path root = testing::fresh_test_dir("loopmoe_device_trainer", "run");
  testing::write_pattern_corpus(root / "data");
  model::Config cfg = testing::tiny_loopmoe_config(root / "data");
  cfg.train.steps = 12;
  auto options = [&](const std::string& name) {
    train::TrainOptions o;
    o.out_dir = (root / name).string();
    o.progress = false;
    return o;
  };
  train::TrainResult cpu;
  {
    DeviceScope scope(Device::kCpu);
    cpu = train::run_training(cfg, options("cpu"));
  }
  std::vector<double> dev_losses;
  {
    DeviceScope scope(Device::kHostAsDevice);
    train::TrainOptions o = options("dev");
    o.stop_after = 6;
    dev_losses = train::run_training(cfg, o).losses;
    o.stop_after = -1;
    o.resume = true;
    const train::TrainResult rest = train::run_training(cfg, o);
    dev_losses.insert(dev_losses.end(), rest.losses.begin(), rest.losses.end());
    EXPECT_EQ(std::memcmp(&rest.final_val_loss, &cpu.final_val_loss, sizeof(double)), 0);
  }
  ASSERT_EQ(cpu.losses.size(), 12u);
  EXPECT_TRUE(same_bits(dev_losses, cpu.losses));
  auto read_all = [](const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  const std::string a = read_all(root / "cpu" / "checkpoint.bin");
  EXPECT_FALSE(a.empty());
  EXPECT_TRUE(a == read_all(root / "dev" / "checkpoint.bin")) << "checkpoint bytes";
  fs::remove_all(root);
}

}  // namespace
}  // namespace loopmoe
