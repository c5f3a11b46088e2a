// Every binary file format detects any single-bit flip anywhere in the file (issue 11): the
// single-process checkpoint and the token shard, each written small and then corrupted at every
// byte in turn; truncation and appended bytes are refused; version 1 files still read. (The worker
// and shard checkpoint files are tested the same way in tests/cluster/test_cluster.cc.)
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "dataloader/data_error.h"
#include "dataloader/token_shard.h"
#include "model/config.h"
#include "model/error.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "tests/tiny_run.h"
#include "train/checkpoint.h"

namespace loopmoe {
namespace {

namespace fs = std::filesystem;

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_all(const fs::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary | std::ios::trunc) << bytes;
}

// XORs `mask` into byte `at` of the file in place.
void xor_byte(const fs::path& p, uint64_t at, unsigned char mask) {
  const int fd = ::open(p.c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0) << p;
  unsigned char b = 0;
  ASSERT_EQ(::pread(fd, &b, 1, static_cast<off_t>(at)), 1);
  b ^= mask;
  ASSERT_EQ(::pwrite(fd, &b, 1, static_cast<off_t>(at)), 1);
  ::close(fd);
}

// For every byte in [begin, end) of the file at `p` (end 0: the whole file) and every mask: flips
// it, runs `read`, which must throw `Error`, and flips it back. Returns the number of corrupted
// files tried.
template <typename Error>
int expect_every_flip_detected(const fs::path& p, const std::vector<unsigned char>& masks,
                               const std::function<void()>& read, uint64_t begin = 0,
                               uint64_t end = 0) {
  if (end == 0) end = fs::file_size(p);
  int tried = 0, missed = 0;
  for (uint64_t at = begin; at < end; ++at) {
    for (unsigned char mask : masks) {
      xor_byte(p, at, mask);
      ++tried;
      try {
        read();
        if (++missed <= 10) ADD_FAILURE() << "byte " << at << " ^ " << int{mask} << " accepted";
      } catch (const Error&) {
      }
      xor_byte(p, at, mask);
    }
  }
  EXPECT_EQ(missed, 0) << "of " << tried << " corrupted files";
  return tried;
}

template <typename Error>
void expect_error_with(const std::function<void()>& fn, const fs::path& file,
                       const std::string& what) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected \"" << what << "\"";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind(file.string(), 0), 0u) << msg;  // the message starts with the file
    EXPECT_NE(msg.find(what), std::string::npos) << msg;
  }
}

const std::vector<unsigned char> kAllBits = {0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80};

// ---------------------------------------------------------------------------------------------
// The single-process checkpoint (train/checkpoint.cc, magic LMOECKPT)

// Version 1's header is version 2's first 80 bytes; version 2 adds the 8-byte header checksum.
constexpr size_t kCkptHeaderV1 = 80, kCkptHeader = 88, kCkptVersionAt = 8, kCkptStepAt = 32;

class CheckpointIntegrity : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::fresh_test_dir("loopmoe_integrity",
                                   ::testing::UnitTest::GetInstance()->current_test_info()->name());
    path_ = dir_ / "checkpoint.bin";
    // A model of a few hundred parameters: the file is a few KB, so every byte can be flipped.
    config_ = testing::tiny_loopmoe_config(dir_ / "data");
    model::ModelConfig& m = config_.model;
    m.vocab_size = 8;
    m.seq_len = 4;
    m.d_model = 4;
    m.n_heads = 1;
    m.head_dim = 2;
    m.n_layers = 1;
    m.n_loops = 1;
    m.n_experts = 2;
    m.top_k = 1;
    m.expert_hidden = 2;
    m.iter_adaln = model::IterAdaLNMode::kOff;
    model_ = std::make_unique<model::Model>(m);
    adam_ = std::make_unique<model::AdamW>(model_->layout(), config_.train);
    for (size_t i = 0; i < model_->num_params(); ++i) {
      adam_->m()[i] = 0.001f * static_cast<float>(i);
      adam_->v()[i] = 0.002f * static_cast<float>(i);
    }
    adam_->set_steps_taken(5);
    progress_.step = 5;
    progress_.sampler = {7, 1, 3};
    progress_.threads = 2;
    train::save_checkpoint(path_.string(), config_, *model_, *adam_, progress_);
    bytes_ = read_all(path_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Loads the file into a fresh model and optimizer and checks it holds what was saved.
  void expect_loads_unchanged() {
    model::Model model(config_.model);
    model::AdamW adam(model.layout(), config_.train);
    const train::TrainProgress p = train::load_checkpoint(path_.string(), config_, model, adam);
    EXPECT_EQ(p.step, progress_.step);
    EXPECT_EQ(p.sampler.seed, progress_.sampler.seed);
    EXPECT_EQ(p.sampler.epoch, progress_.sampler.epoch);
    EXPECT_EQ(p.sampler.index, progress_.sampler.index);
    EXPECT_EQ(p.threads, progress_.threads);
    EXPECT_EQ(adam.steps_taken(), 5);
    EXPECT_EQ(std::memcmp(model.params(), model_->params(), model.num_params() * sizeof(float)), 0);
    EXPECT_EQ(std::memcmp(adam.m().data(), adam_->m().data(), model.num_params() * sizeof(float)),
              0);
    EXPECT_EQ(std::memcmp(adam.v().data(), adam_->v().data(), model.num_params() * sizeof(float)),
              0);
    EXPECT_EQ(train::read_checkpoint_step(path_.string()), progress_.step);
    EXPECT_EQ(model::to_toml(train::read_checkpoint_config(path_.string())),
              model::to_toml(config_));
  }

  fs::path dir_, path_;
  model::Config config_;
  std::unique_ptr<model::Model> model_;
  std::unique_ptr<model::AdamW> adam_;
  train::TrainProgress progress_;
  std::string bytes_;
};

TEST_F(CheckpointIntegrity, UnmodifiedFileLoads) {
  ASSERT_EQ(bytes_.size(),
            kCkptHeader + model::to_toml(config_).size() + 12 * model_->num_params());
  uint32_t version = 0;
  std::memcpy(&version, bytes_.data() + kCkptVersionAt, 4);
  EXPECT_EQ(version, 2u);
  expect_loads_unchanged();
}

// The case: the header's step 5 → 4 was accepted, and the resumed run redid step 5.
TEST_F(CheckpointIntegrity, FlippedStepIsRejected) {
  xor_byte(path_, kCkptStepAt, 0x01);
  expect_error_with<model::CheckpointError>([&] { train::read_checkpoint_step(path_.string()); },
                                            path_, "header checksum mismatch");
  model::Model model(config_.model);
  model::AdamW adam(model.layout(), config_.train);
  expect_error_with<model::CheckpointError>(
      [&] { train::load_checkpoint(path_.string(), config_, model, adam); }, path_,
      "header checksum mismatch");
}

TEST_F(CheckpointIntegrity, EveryBitFlipAnywhereIsDetected) {
  const auto t0 = std::chrono::steady_clock::now();
  model::Model model(config_.model);
  model::AdamW adam(model.layout(), config_.train);
  const int tried = expect_every_flip_detected<model::CheckpointError>(
      path_, kAllBits, [&] { train::load_checkpoint(path_.string(), config_, model, adam); });
  EXPECT_EQ(tried, static_cast<int>(8 * bytes_.size()));
  // The other readers check as much: read_checkpoint_step the header (all of it), the others
  // the whole file.
  expect_every_flip_detected<model::CheckpointError>(
      path_, kAllBits, [&] { train::read_checkpoint_step(path_.string()); }, 0, kCkptHeader);
  expect_every_flip_detected<model::CheckpointError>(path_, {0x01, 0x80}, [&] {
    model::Config c;
    train::load_model(path_.string(), &c);
  });
  expect_every_flip_detected<model::CheckpointError>(
      path_, {0x01, 0x80}, [&] { train::read_checkpoint_config(path_.string()); });
  EXPECT_EQ(read_all(path_), bytes_);  // every flip was undone
  expect_loads_unchanged();
  std::printf("%d corrupted %zu-byte checkpoints rejected in %.2f s\n", tried, bytes_.size(),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

TEST_F(CheckpointIntegrity, TruncationAndTrailingBytesAreRefused) {
  for (size_t keep :
       {size_t{0}, size_t{5}, size_t{8}, kCkptHeaderV1 - 1, kCkptHeaderV1, kCkptHeader - 1}) {
    write_all(path_, bytes_.substr(0, keep));
    expect_error_with<model::CheckpointError>([&] { train::read_checkpoint_step(path_.string()); },
                                              path_, "truncated checkpoint (no complete header)");
  }
  for (size_t keep : {kCkptHeader, kCkptHeader + 1, bytes_.size() / 2, bytes_.size() - 1}) {
    write_all(path_, bytes_.substr(0, keep));
    expect_error_with<model::CheckpointError>(
        [&] { train::read_checkpoint_config(path_.string()); }, path_,
        "truncated checkpoint: header implies " + std::to_string(bytes_.size()) +
            " bytes, file has " + std::to_string(keep));
  }
  write_all(path_, bytes_ + '\0');
  expect_error_with<model::CheckpointError>(
      [&] { train::read_checkpoint_config(path_.string()); }, path_,
      "trailing bytes after the checkpoint: header implies " + std::to_string(bytes_.size()) +
          " bytes, file has " + std::to_string(bytes_.size() + 1));
  write_all(path_, "LMOECKPX" + bytes_.substr(8));
  expect_error_with<model::CheckpointError>([&] { train::read_checkpoint_step(path_.string()); },
                                            path_, "not a LoopMoE checkpoint (bad magic)");
  std::string v3 = bytes_;
  v3[kCkptVersionAt] = 3;
  write_all(path_, v3);
  expect_error_with<model::CheckpointError>(
      [&] { train::read_checkpoint_step(path_.string()); }, path_,
      "checkpoint version 3 is not supported (this build reads "
      "versions 1 and 2");
}

// A version 1 file is version 2's without the header checksum. It still loads (its header
// unverified, as before); its payload checksum still holds.
TEST_F(CheckpointIntegrity, Version1StillLoads) {
  std::string v1 = bytes_.substr(0, kCkptHeaderV1) + bytes_.substr(kCkptHeader);
  v1[kCkptVersionAt] = 1;
  write_all(path_, v1);
  expect_loads_unchanged();
  write_all(path_, v1 + 'x');
  expect_error_with<model::CheckpointError>([&] { train::read_checkpoint_config(path_.string()); },
                                            path_, "trailing bytes");
  v1[v1.size() - 3] ^= 0x10;  // in v
  write_all(path_, v1);
  expect_error_with<model::CheckpointError>([&] { train::read_checkpoint_config(path_.string()); },
                                            path_, "checksum mismatch (corrupt file)");
}

// ---------------------------------------------------------------------------------------------
// Token shards (dataloader/token_shard.cc, magic LMOETOK)

constexpr size_t kShardVersionAt = 8;

class ShardIntegrity : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::fresh_test_dir("loopmoe_integrity",
                                   ::testing::UnitTest::GetInstance()->current_test_info()->name());
    path_ = dir_ / "shard.bin";
    for (int i = 0; i < 40; ++i) tokens_.push_back((i * 37 + 5) % 700);
    offsets_ = {0, 3, 3, 17, 40};
    dataloader::write_token_shard(path_, 700, tokens_, offsets_);
    bytes_ = read_all(path_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  void expect_opens_unchanged() {
    const dataloader::TokenShard s = dataloader::TokenShard::open(path_);
    EXPECT_EQ(s.vocab_size(), 700u);
    EXPECT_EQ(s.num_docs(), offsets_.size() - 1);
    std::vector<int32_t> got(tokens_.size());
    s.read(0, got.size(), got.data());
    EXPECT_EQ(got, tokens_);
    EXPECT_EQ(s.doc_range(2).begin, 3u);
    EXPECT_EQ(dataloader::read_shard_header(path_).num_tokens, tokens_.size());
  }

  fs::path dir_, path_;
  std::vector<int32_t> tokens_;
  std::vector<uint64_t> offsets_;
  std::string bytes_;
};

TEST_F(ShardIntegrity, UnmodifiedFileOpens) {
  ASSERT_EQ(bytes_.size(),
            dataloader::kShardHeaderBytes + 8 * offsets_.size() + 2 * tokens_.size());
  EXPECT_EQ(dataloader::TokenShard::open(path_).version(), 2u);
  expect_opens_unchanged();
}

TEST_F(ShardIntegrity, EveryBitFlipAnywhereIsDetected) {
  const auto t0 = std::chrono::steady_clock::now();
  const int tried = expect_every_flip_detected<dataloader::DataError>(
      path_, kAllBits, [&] { dataloader::TokenShard::open(path_); });
  EXPECT_EQ(tried, static_cast<int>(8 * bytes_.size()));
  // The header alone (what the dataset check reads) shows every flip inside it: the header
  // checksum covers all of its fields.
  expect_every_flip_detected<dataloader::DataError>(
      path_, kAllBits, [&] { dataloader::read_shard_header(path_); }, 0,
      dataloader::kShardHeaderBytes);
  EXPECT_EQ(read_all(path_), bytes_);  // every flip was undone
  expect_opens_unchanged();
  std::printf("%d corrupted %zu-byte shards rejected in %.2f s\n", tried, bytes_.size(),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

TEST_F(ShardIntegrity, TruncationAndTrailingBytesAreRefused) {
  for (size_t keep : {size_t{0}, size_t{12}, dataloader::kShardHeaderBytes - 1}) {
    write_all(path_, bytes_.substr(0, keep));
    const std::string what = keep == 0 ? "bad magic" : "less than the 56-byte header";
    expect_error_with<dataloader::DataError>([&] { dataloader::TokenShard::open(path_); }, path_,
                                             what);
    expect_error_with<dataloader::DataError>([&] { dataloader::read_shard_header(path_); }, path_,
                                             what);
  }
  for (size_t keep :
       {dataloader::kShardHeaderBytes, dataloader::kShardHeaderBytes + 20, bytes_.size() - 1}) {
    write_all(path_, bytes_.substr(0, keep));
    expect_error_with<dataloader::DataError>([&] { dataloader::TokenShard::open(path_); }, path_,
                                             "truncated: header says ");
  }
  write_all(path_, bytes_ + '\0');
  expect_error_with<dataloader::DataError>([&] { dataloader::TokenShard::open(path_); }, path_,
                                           "trailing bytes");
  std::string v3 = bytes_;
  v3[kShardVersionAt] = 3;
  write_all(path_, v3);
  expect_error_with<dataloader::DataError>(
      [&] { dataloader::TokenShard::open(path_); }, path_,
      "unsupported version 3 (this build reads versions 1 and 2");
}

// A version 1 shard is version 2's without the header checksum; it still opens, with its
// payload checksum and every structural check.
TEST_F(ShardIntegrity, Version1StillOpens) {
  std::string v1 = bytes_.substr(0, dataloader::kShardHeaderBytesV1) +
                   bytes_.substr(dataloader::kShardHeaderBytes);
  v1[kShardVersionAt] = 1;
  write_all(path_, v1);
  EXPECT_EQ(dataloader::TokenShard::open(path_).version(), 1u);
  expect_opens_unchanged();
  write_all(path_, v1 + "xy");
  expect_error_with<dataloader::DataError>([&] { dataloader::TokenShard::open(path_); }, path_,
                                           "trailing bytes");
  v1[v1.size() - 1] ^= 0x01;
  write_all(path_, v1);
  expect_error_with<dataloader::DataError>([&] { dataloader::TokenShard::open(path_); }, path_,
                                           "checksum mismatch");
}

}  // namespace
}  // namespace loopmoe
