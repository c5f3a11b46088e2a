// Writes the binary seeds of the fuzz corpora (docs/FUZZING.md) with the project's own writers, so
// they follow the formats: `make_seeds DIR` fills DIR/<target>/ for token_shard_fuzzer,
// checkpoint_fuzzer, process_checkpoint_fuzzer, submit_job_fuzzer and training_process_fuzzer
// (the text seeds of config_fuzzer and job_spec_fuzzer are kept by hand). Each version 1 seed is
// its version 2 file with the header checksum taken out, as version 1 writers wrote it.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "dataloader/token_shard.h"
#include "fuzz/fuzz_util.h"
#include "fuzz/tiny_config.h"
#include "model/config.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "proto/loopmoe.pb.h"
#include "runtime/process_checkpoint.h"
#include "train/checkpoint.h"

namespace loopmoe::fuzz {
namespace {

namespace fs = std::filesystem;
namespace pb = loopmoe::v1;

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_all(const fs::path& p, const std::string& bytes) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary | std::ios::trunc) << bytes;
  std::printf("%s (%zu bytes)\n", p.c_str(), bytes.size());
}

// A version 2 file as version 1: version 1 at offset 8, the 8 header-checksum bytes at
// `header_checksum_at` removed.
std::string as_version_1(std::string v2, size_t header_checksum_at) {
  store_le<uint32_t>(v2, 8, 1);
  v2.erase(header_checksum_at, 8);
  return v2;
}

void token_shards(const fs::path& dir) {
  const std::vector<int32_t> tokens = {1, 5, 7, 2, 0, 3, 3, 9, 15, 0, 4, 8, 12, 6, 0};
  const std::vector<uint64_t> docs = {0, 5, 10, 15};
  dataloader::write_token_shard(dir / "v2.bin", 16, tokens, docs);
  const std::vector<int32_t> wide = {70000, 1, 69999, 0};
  const std::vector<uint64_t> wide_docs = {0, 2, 4};
  dataloader::write_token_shard(dir / "v2_wide.bin", 70001, wide, wide_docs);
  write_all(dir / "v1.bin", as_version_1(read_all(dir / "v2.bin"), 48));
}

void checkpoints(const fs::path& dir) {
  const model::Config config = tiny_config();
  model::Model model(config.model);
  model::AdamW adam(model.layout(), config.train);
  for (size_t i = 0; i < model.num_params(); ++i) {
    adam.m()[i] = 0.001f * static_cast<float>(i);
    adam.v()[i] = 0.002f * static_cast<float>(i);
  }
  adam.set_steps_taken(3);
  train::TrainProgress progress;
  progress.step = 3;
  progress.sampler = {7, 1, 3};
  train::save_checkpoint((dir / "v2.bin").string(), config, model, adam, progress);
  write_all(dir / "v1.bin", as_version_1(read_all(dir / "v2.bin"), 80));
}

void process_checkpoints(const fs::path& dir) {
  runtime::WorkerCheckpoint w;
  w.rank = 1;
  w.step = 4;
  w.adam_steps = 4;
  w.sampler = {7, 0, 12};
  w.config_hash = runtime::config_hash(model::to_toml(tiny_config()));
  w.params = {0.5f, -1.0f, 2.0f};
  w.m = {0.1f, 0.2f, 0.3f};
  w.v = {0.01f, 0.02f, 0.03f};
  runtime::write_worker_checkpoint((dir / "worker_v2.bin").string(), w, nullptr);
  write_all(dir / "worker_v1.bin", as_version_1(read_all(dir / "worker_v2.bin"), 80));
  runtime::ShardCheckpoint s;
  s.rank = 0;
  s.step = 4;
  s.adam_steps = 4;
  s.config_hash = w.config_hash;
  s.num_layers = 1;
  s.first_expert = 0;
  s.num_experts = 2;
  s.floats_per_expert = 3;
  s.params = {1, 2, 3, 4, 5, 6};
  s.m = {0, 0, 0, 0, 0, 1};
  s.v = {0, 0, 0, 0, 0, 2};
  runtime::write_shard_checkpoint((dir / "shard_v2.bin").string(), s, nullptr);
  write_all(dir / "shard_v1.bin", as_version_1(read_all(dir / "shard_v2.bin"), 72));
  // Regression (docs/FUZZING.md "Findings"): 2 layers x 1 expert x 2^63 floats per expert wraps
  // to 0 floats, which the header-only file then matches.
  std::string wrap = read_all(dir / "shard_v2.bin").substr(0, 80);
  store_le<uint32_t>(wrap, 40, 2);                   // num_layers
  store_le<uint32_t>(wrap, 48, 1);                   // num_experts
  store_le<uint64_t>(wrap, 56, uint64_t{1} << 63);   // floats_per_expert
  store_le<uint64_t>(wrap, 64, xxh64(wrap, 80));     // payload checksum (no payload)
  store_le<uint64_t>(wrap, 72, xxh64(wrap, 0, 72));  // header checksum
  write_all(dir / "regression_shard_size_wraps.bin", wrap);
}

pb::JobSpec spec(const pb::LoopSchedule::Kind kind) {
  pb::JobSpec s;
  s.set_name("fuzz");
  s.set_config_toml(model::to_toml(tiny_config()));
  s.set_num_workers(2);
  s.set_num_shards(2);
  s.set_threads(1);
  s.set_output_dir("/fuzz/out");
  s.mutable_schedule()->set_kind(kind);
  if (kind == pb::LoopSchedule::LIST) {
    s.mutable_schedule()->add_loops(1);
    s.mutable_schedule()->add_loops(3);
  } else if (kind == pb::LoopSchedule::UNIFORM) {
    s.mutable_schedule()->set_min_loops(1);
    s.mutable_schedule()->set_max_loops(4);
    s.mutable_schedule()->set_seed(7);
  }
  return s;
}

void submit_requests(const fs::path& dir) {
  const char* names[] = {"fixed.pb", "list.pb", "uniform.pb"};
  for (auto kind : {pb::LoopSchedule::FIXED, pb::LoopSchedule::LIST, pb::LoopSchedule::UNIFORM}) {
    pb::SubmitJobRequest request;
    *request.mutable_spec() = spec(kind);
    write_all(dir / names[kind], request.SerializeAsString());
  }
}

// A training_process_fuzzer input: FuzzedDataProvider takes the request bytes (strings) from the
// front, a backslash and another character ending each, and the choices (role, RPC, the fake
// runtime's failures) one byte each from the back.
class Session {
 public:
  explicit Session(bool worker) { choices_.push_back(worker ? 1 : 0); }
  // One RPC (0 Configure .. 4 Shutdown) and the runtime calls it makes, none failing.
  Session& call(int rpc, const google::protobuf::Message& request, int runtime_calls) {
    choices_.push_back(static_cast<uint8_t>(rpc));
    for (char c : request.SerializeAsString()) {
      front_ += c;
      if (c == '\\') front_ += c;
    }
    front_ += "\\ ";
    choices_.insert(choices_.end(), runtime_calls, 0);
    return *this;
  }
  std::string bytes() const { return front_ + std::string(choices_.rbegin(), choices_.rend()); }

 private:
  std::string front_;
  std::vector<uint8_t> choices_;
};

void sessions(const fs::path& dir) {
  for (bool worker : {true, false}) {
    pb::ConfigureRequest configure;
    configure.set_job_id("j-1");
    configure.set_role(worker ? pb::WORKER : pb::EXPERT_SHARD);
    configure.set_rank(0);
    configure.set_num_workers(1);
    configure.set_num_shards(2);
    configure.set_config_toml(model::to_toml(tiny_config()));
    configure.set_threads(1);
    configure.set_rendezvous_prefix("job/j-1/epoch/0/");
    configure.set_output_dir("/fuzz/out");
    if (!worker) {
      pb::CheckpointMeta* resume = configure.mutable_resume();
      resume->set_job_id("j-1");
      resume->set_step(2);
      pb::CheckpointFile* file = resume->add_files();
      file->set_role(pb::EXPERT_SHARD);
      file->set_path("/fuzz/out/step-2/shard-0.bin");
      resume->mutable_sampler()->set_seed(7);
    }
    pb::RunStepsRequest run;
    run.set_job_id("j-1");
    run.set_first_step(worker ? 0 : 2);
    run.add_loops(2);
    run.add_loops(1);
    pb::EvaluateRequest evaluate;
    evaluate.set_job_id("j-1");
    pb::CheckpointRequest checkpoint;
    checkpoint.set_job_id("j-1");
    checkpoint.set_step(worker ? 2 : 4);
    checkpoint.set_dir("/fuzz/out/step-2");
    pb::ShutdownRequest shutdown;
    shutdown.set_job_id("j-1");
    shutdown.set_exit(true);
    const Session s = Session(worker)
                          .call(0, configure, 1)
                          .call(1, run, 2)
                          .call(2, evaluate, 1)
                          .call(3, checkpoint, 1)
                          .call(4, shutdown, 0);
    write_all(dir / (worker ? "worker_session.bin" : "shard_session.bin"), s.bytes());
  }
}

}  // namespace
}  // namespace loopmoe::fuzz

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seeds CORPUS_DIR (e.g. fuzz/corpus)\n");
    return 2;
  }
  namespace fs = std::filesystem;
  const fs::path dir(argv[1]);
  for (const char* t : {"token_shard_fuzzer", "checkpoint_fuzzer", "process_checkpoint_fuzzer",
                        "submit_job_fuzzer", "training_process_fuzzer"}) {
    fs::create_directories(dir / t);
  }
  loopmoe::fuzz::token_shards(dir / "token_shard_fuzzer");
  loopmoe::fuzz::checkpoints(dir / "checkpoint_fuzzer");
  loopmoe::fuzz::process_checkpoints(dir / "process_checkpoint_fuzzer");
  loopmoe::fuzz::submit_requests(dir / "submit_job_fuzzer");
  loopmoe::fuzz::sessions(dir / "training_process_fuzzer");
  return 0;
}
