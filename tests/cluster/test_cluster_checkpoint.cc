// The distributed runtime's checkpoint files: every flipped bit, truncation and appended bytes are
// refused, and version 1 files still read.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "cluster_fixture.h"
#include "model/error.h"
#include "runtime/process_checkpoint.h"

namespace loopmoe::runtime {
namespace {

namespace fs = std::filesystem;

using testing::ClusterTest;

// --- Checkpoint files: every flipped bit, truncation and appended bytes are refused -------------
// (issue 11; the single-process checkpoint and token shards: tests/test_file_integrity.cc)

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary | std::ios::trunc) << bytes;
}

// XORs `mask` into byte `at` of the file in place.
void xor_byte(const fs::path& p, uint64_t at, unsigned char mask) {
  std::fstream f(p, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(at));
  const char b = static_cast<char>(f.get() ^ mask);
  f.seekp(static_cast<std::streamoff>(at));
  f.put(b);
}

// Flips every bit of every byte of the file in turn (and back); `read` must throw
// CheckpointError naming the file each time. Returns the number of corrupted files tried.
int expect_every_flip_detected(const fs::path& p, const std::function<void()>& read) {
  const uint64_t size = fs::file_size(p);
  int tried = 0, missed = 0;
  for (uint64_t at = 0; at < size; ++at) {
    for (int bit = 0; bit < 8; ++bit) {
      const auto mask = static_cast<unsigned char>(1 << bit);
      xor_byte(p, at, mask);
      ++tried;
      try {
        read();
        if (++missed <= 10) ADD_FAILURE() << "byte " << at << " ^ " << int{mask} << " accepted";
      } catch (const model::CheckpointError& e) {
        if (std::string(e.what()).rfind(p.string(), 0) != 0) ADD_FAILURE() << e.what();
      }
      xor_byte(p, at, mask);
    }
  }
  EXPECT_EQ(missed, 0) << "of " << tried << " corrupted files";
  return tried;
}

void expect_checkpoint_error(const std::function<void()>& fn, const std::string& what) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected \"" << what << "\"";
  } catch (const model::CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
  }
}

std::vector<float> ramp(size_t n, float scale) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = scale * static_cast<float>(i) - 1.f;
  return v;
}

WorkerCheckpoint small_worker_checkpoint() {
  WorkerCheckpoint c;
  c.rank = 1;
  c.step = 5;
  c.adam_steps = 5;
  c.sampler = {7, 1, 3};
  c.config_hash = 0x0123456789abcdefULL;
  c.params = ramp(40, 0.5f);
  c.m = ramp(40, 0.25f);
  c.v = ramp(40, 0.125f);
  return c;
}

ShardCheckpoint small_shard_checkpoint() {
  ShardCheckpoint c;
  c.rank = 2;
  c.step = 5;
  c.adam_steps = 5;
  c.config_hash = 0x0123456789abcdefULL;
  c.num_layers = 2;
  c.first_expert = 1;
  c.num_experts = 2;
  c.floats_per_expert = 6;
  c.params = ramp(24, 0.5f);
  c.m = ramp(24, 0.25f);
  c.v = ramp(24, 0.125f);
  return c;
}

void expect_same(const WorkerCheckpoint& a, const WorkerCheckpoint& b) {
  EXPECT_EQ(a.rank, b.rank);
  EXPECT_EQ(a.step, b.step);
  EXPECT_EQ(a.adam_steps, b.adam_steps);
  EXPECT_EQ(a.sampler.seed, b.sampler.seed);
  EXPECT_EQ(a.sampler.epoch, b.sampler.epoch);
  EXPECT_EQ(a.sampler.index, b.sampler.index);
  EXPECT_EQ(a.config_hash, b.config_hash);
  EXPECT_EQ(a.params, b.params);
  EXPECT_EQ(a.m, b.m);
  EXPECT_EQ(a.v, b.v);
}

void expect_same(const ShardCheckpoint& a, const ShardCheckpoint& b) {
  EXPECT_EQ(a.rank, b.rank);
  EXPECT_EQ(a.step, b.step);
  EXPECT_EQ(a.adam_steps, b.adam_steps);
  EXPECT_EQ(a.config_hash, b.config_hash);
  EXPECT_EQ(a.num_layers, b.num_layers);
  EXPECT_EQ(a.first_expert, b.first_expert);
  EXPECT_EQ(a.num_experts, b.num_experts);
  EXPECT_EQ(a.floats_per_expert, b.floats_per_expert);
  EXPECT_EQ(a.params, b.params);
  EXPECT_EQ(a.m, b.m);
  EXPECT_EQ(a.v, b.v);
}

// Header sizes: version 2 is version 1's header plus the 8-byte header checksum.
constexpr size_t kWorkerHeaderV1 = 80, kShardHeaderV1 = 72, kVersionAt = 8;

TEST_F(ClusterTest, CorruptWorkerCheckpointAnyBitFlipIsDetected) {
  const fs::path path = dir_ / "worker-1.bin";
  const WorkerCheckpoint c = small_worker_checkpoint();
  int64_t bytes = 0;
  const uint64_t sum = write_worker_checkpoint(path.string(), c, &bytes);
  ASSERT_EQ(static_cast<uint64_t>(bytes), fs::file_size(path));
  ASSERT_EQ(fs::file_size(path), kWorkerHeaderV1 + 8 + 3 * 40 * sizeof(float));
  expect_same(read_worker_checkpoint(path.string(), 0), c);
  expect_same(read_worker_checkpoint(path.string(), sum), c);
  expect_checkpoint_error([&] { read_worker_checkpoint(path.string(), sum + 1); },
                          "differs from the one recorded in the checkpoint metadata");
  // Detected by the file itself, whether or not the caller has a recorded checksum.
  const int tried =
      expect_every_flip_detected(path, [&] { read_worker_checkpoint(path.string(), 0); });
  EXPECT_EQ(tried, 8 * bytes);
  expect_every_flip_detected(path, [&] { read_worker_checkpoint(path.string(), sum); });
  expect_same(read_worker_checkpoint(path.string(), sum), c);
}

TEST_F(ClusterTest, CorruptShardCheckpointAnyBitFlipIsDetected) {
  const fs::path path = dir_ / "shard-2.bin";
  const ShardCheckpoint c = small_shard_checkpoint();
  int64_t bytes = 0;
  const uint64_t sum = write_shard_checkpoint(path.string(), c, &bytes);
  ASSERT_EQ(static_cast<uint64_t>(bytes), fs::file_size(path));
  ASSERT_EQ(fs::file_size(path), kShardHeaderV1 + 8 + 3 * 24 * sizeof(float));
  expect_same(read_shard_checkpoint(path.string(), 0), c);
  expect_same(read_shard_checkpoint(path.string(), sum), c);
  expect_checkpoint_error([&] { read_shard_checkpoint(path.string(), sum ^ 1); },
                          "differs from the one recorded in the checkpoint metadata");
  const int tried =
      expect_every_flip_detected(path, [&] { read_shard_checkpoint(path.string(), 0); });
  EXPECT_EQ(tried, 8 * bytes);
  expect_every_flip_detected(path, [&] { read_shard_checkpoint(path.string(), sum); });
  expect_same(read_shard_checkpoint(path.string(), sum), c);
}

TEST_F(ClusterTest, CorruptProcessCheckpointTruncatedOrExtendedIsRefused) {
  const fs::path worker = dir_ / "worker-1.bin", shard = dir_ / "shard-2.bin";
  write_worker_checkpoint(worker.string(), small_worker_checkpoint(), nullptr);
  write_shard_checkpoint(shard.string(), small_shard_checkpoint(), nullptr);
  for (const auto& file :
       {std::pair{worker, kWorkerHeaderV1 + 8}, std::pair{shard, kShardHeaderV1 + 8}}) {
    // Named copies, not a structured binding: the lambda below captures the path, which clang 14
    // (the thread-safety check's compiler) refuses for a binding.
    const fs::path& path = file.first;
    const size_t header = file.second;
    SCOPED_TRACE(path.string());
    const std::string whole = read_bytes(path);
    const auto read = [&] {
      if (path == worker) {
        read_worker_checkpoint(path.string(), 0);
      } else {
        read_shard_checkpoint(path.string(), 0);
      }
    };
    for (size_t keep : {size_t{0}, size_t{8}, header - 9, header - 1}) {
      write_bytes(path, whole.substr(0, keep));
      expect_checkpoint_error(read,
                              path.string() + ": truncated checkpoint file (no complete header)");
    }
    for (size_t keep : {header, header + 1, whole.size() - 1}) {
      write_bytes(path, whole.substr(0, keep));
      expect_checkpoint_error(read, path.string() + ": truncated checkpoint file: header implies " +
                                        std::to_string(whole.size()) + " bytes, file has " +
                                        std::to_string(keep));
    }
    write_bytes(path, whole + '\0');
    expect_checkpoint_error(read,
                            path.string() + ": trailing bytes after the checkpoint file's data");
    std::string v3 = whole;
    v3[kVersionAt] = 3;
    write_bytes(path, v3);
    expect_checkpoint_error(read,
                            "checkpoint file version 3 is not supported (this build reads "
                            "versions 1 and 2");
  }
}

// Version 1 files (a job committed before the upgrade) still resume: version 2's bytes without
// the header checksum. Their recorded checksum is the payload's, which the header holds.
TEST_F(ClusterTest, ProcessCheckpointVersion1StillReads) {
  const fs::path worker = dir_ / "worker-1.bin", shard = dir_ / "shard-2.bin";
  const WorkerCheckpoint w = small_worker_checkpoint();
  const ShardCheckpoint s = small_shard_checkpoint();
  write_worker_checkpoint(worker.string(), w, nullptr);
  write_shard_checkpoint(shard.string(), s, nullptr);
  const auto to_v1 = [](const fs::path& p, size_t v1_header) {
    const std::string v2 = read_bytes(p);
    std::string v1 = v2.substr(0, v1_header) + v2.substr(v1_header + 8);
    v1[kVersionAt] = 1;
    write_bytes(p, v1);
    uint64_t payload_sum = 0;
    std::memcpy(&payload_sum, v1.data() + v1_header - 8, 8);  // the header's last field
    return payload_sum;
  };
  const uint64_t worker_sum = to_v1(worker, kWorkerHeaderV1);
  const uint64_t shard_sum = to_v1(shard, kShardHeaderV1);
  expect_same(read_worker_checkpoint(worker.string(), 0), w);
  expect_same(read_worker_checkpoint(worker.string(), worker_sum), w);
  expect_same(read_shard_checkpoint(shard.string(), 0), s);
  expect_same(read_shard_checkpoint(shard.string(), shard_sum), s);
  expect_checkpoint_error([&] { read_worker_checkpoint(worker.string(), worker_sum + 1); },
                          "differs from the one recorded");
  xor_byte(shard, fs::file_size(shard) - 1, 0x01);
  expect_checkpoint_error([&] { read_shard_checkpoint(shard.string(), 0); },
                          shard.string() + ": checksum mismatch (file is corrupt)");
}

}  // namespace
}  // namespace loopmoe::runtime
