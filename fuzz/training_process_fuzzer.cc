// The TrainingProcess service of a worker or expert shard (process/training_process_server.cc):
// a session of requests as the coordinator (or anyone reaching the port) sends them. The input is
// the process's role, then records of (RPC, proto bytes of its request); each parsed request goes
// to the server's handler in order. The runtime behind it is a fake that counts steps and, as the
// input says, fails a call with each kind of error the real runtimes throw, so the fuzzer covers
// the request validation, the job state machine and the error mapping. Every answer must carry
// one of the status codes the server documents, and the server's state must follow it.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>

#include "comm/comm_error.h"
#include "comm/key_value_store.h"
#include "dataloader/data_error.h"
#include "fuzz/fuzz_util.h"
#include "model/error.h"
#include "process/training_process_server.h"
#include "proto/loopmoe.pb.h"
#include "runtime/process_runtime.h"

namespace loopmoe::fuzz {
namespace {

namespace pb = loopmoe::v1;

// Rendezvous keys in a map; the fake runtime never waits for peers.
class MapStore final : public comm::KeyValueStore {
 public:
  void set(const std::string& key, const std::string& value) override { kv_[key] = value; }
  std::optional<std::string> get(const std::string& key) override {
    auto it = kv_.find(key);
    if (it == kv_.end()) return std::nullopt;
    return it->second;
  }
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds) override {
    for (const std::string& k : keys) {
      if (!kv_.count(k)) throw comm::TimeoutError("rendezvous key " + k + " is missing");
    }
  }

 private:
  std::map<std::string, std::string> kv_;
};

// Throws what the input says: mostly nothing, else one of the errors a runtime raises.
void maybe_throw(FuzzedDataProvider& in, const char* what) {
  switch (in.ConsumeIntegralInRange<int>(0, 13)) {
    case 6:
      throw comm::CommError(std::string(what) + ": peer gone");
    case 7:
      throw comm::TimeoutError(std::string(what) + ": peer timed out");
    case 8:
      throw dataloader::DataError(std::string(what) + ": bad data");
    case 9:
      throw model::CheckpointError(std::string(what) + ": bad checkpoint");
    case 10:
      throw model::ConfigError(std::string(what) + ": bad config");
    case 11:
      throw std::runtime_error(std::string(what) + ": something else");
    case 12:
      throw runtime::PolicyStop(std::string(what) + ": nan (stop)");
    case 13:
      throw runtime::PolicyRollback(std::string(what) + ": nan (rollback)",
                                    in.ConsumeIntegral<int64_t>());
    default:
      return;
  }
}

class FakeRuntime final : public runtime::ProcessRuntime {
 public:
  FakeRuntime(FuzzedDataProvider& in, const runtime::ProcessSetup& setup)
      : in_(in), setup_(setup), steps_done_(setup.resume ? setup.resume->step : 0) {}

  runtime::Role role() const override { return setup_.role; }
  int rank() const override { return setup_.rank; }
  int64_t steps_done() const override { return steps_done_; }
  runtime::StepReport step(int loops) override {
    maybe_throw(in_, "step");
    runtime::StepReport r;
    r.step = ++steps_done_;
    r.loops = loops;
    r.loss = 1.0;
    return r;
  }
  runtime::StepReport drop_step(int loops) override {
    maybe_throw(in_, "drop_step");
    runtime::StepReport r;
    r.step = ++steps_done_;
    r.loops = loops;
    r.skipped = true;
    return r;
  }
  double evaluate(int batches) override {
    maybe_throw(in_, "evaluate");
    check(batches >= 1, "evaluate(" + std::to_string(batches) + ")");
    return 2.5;
  }
  runtime::CheckpointFileRef checkpoint(const std::string& dir) override {
    maybe_throw(in_, "checkpoint");
    check(!dir.empty(), "checkpoint into an empty dir");
    return {setup_.role, setup_.rank, dir + "/file.bin", 1, 2};
  }
  dataloader::SamplerState sampler_state() const override { return {}; }

 private:
  FuzzedDataProvider& in_;
  const runtime::ProcessSetup setup_;
  int64_t steps_done_;
};

const std::set<grpc::StatusCode> kDocumented = {grpc::StatusCode::OK,
                                                grpc::StatusCode::INVALID_ARGUMENT,
                                                grpc::StatusCode::FAILED_PRECONDITION,
                                                grpc::StatusCode::UNAVAILABLE,
                                                grpc::StatusCode::DEADLINE_EXCEEDED,
                                                grpc::StatusCode::INTERNAL,
                                                grpc::StatusCode::ABORTED};

void check_status(const grpc::Status& status, const char* rpc) {
  check(kDocumented.count(status.error_code()) == 1,
        std::string(rpc) + " answered an undocumented status code " +
            std::to_string(status.error_code()) + ": " + status.error_message());
}

void fuzz_session(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  MapStore store;
  process::TrainingProcessOptions options;
  options.role = in.ConsumeBool() ? runtime::Role::kWorker : runtime::Role::kExpertShard;
  options.rendezvous_store = &store;
  options.factory = [&in](const runtime::ProcessSetup& setup) {
    check(setup.store != nullptr && setup.threads >= 1 && setup.num_workers >= 1 &&
              setup.num_shards >= 1 && setup.rank >= 0,
          "the runtime factory got an invalid setup");
    maybe_throw(in, "joining");
    return std::make_unique<FakeRuntime>(in, setup);
  };
  bool exit_requested = false;
  options.request_exit = [&exit_requested] { exit_requested = true; };
  process::TrainingProcessServer server(std::move(options));

  for (int calls = 0; calls < 32 && in.remaining_bytes() > 0; ++calls) {
    const int rpc = in.ConsumeIntegralInRange<int>(0, 4);
    const std::string bytes = in.ConsumeRandomLengthString(2048);
    const std::optional<std::string> before = server.current_job();
    switch (rpc) {
      case 0: {
        pb::ConfigureRequest request;
        pb::ConfigureResponse response;
        if (!request.ParseFromString(bytes)) break;
        const grpc::Status status = server.Configure(nullptr, &request, &response);
        check_status(status, "Configure");
        if (status.ok()) {
          check(server.current_job() == request.job_id(), "Configure OK but not in its job");
        }
        break;
      }
      case 1: {
        pb::RunStepsRequest request;
        pb::RunStepsResponse response;
        if (!request.ParseFromString(bytes)) break;
        const grpc::Status status = server.RunSteps(nullptr, &request, &response);
        check_status(status, "RunSteps");
        pb::RunFailure detail;
        check(status.error_details().empty() ||
                  (status.error_code() == grpc::StatusCode::ABORTED &&
                   detail.ParseFromString(status.error_details()) && detail.has_rollback_step()),
              "RunSteps details that are not a rollback's pb::RunFailure");
        if (status.ok()) {
          check(before == request.job_id() && response.steps_size() == request.loops_size(),
                "RunSteps OK for another job or with a report per step missing");
        }
        break;
      }
      case 2: {
        pb::EvaluateRequest request;
        pb::EvaluateResponse response;
        if (!request.ParseFromString(bytes)) break;
        const grpc::Status status = server.Evaluate(nullptr, &request, &response);
        check_status(status, "Evaluate");
        if (status.ok()) check(before == request.job_id(), "Evaluate OK for another job");
        break;
      }
      case 3: {
        pb::CheckpointRequest request;
        pb::CheckpointResponse response;
        if (!request.ParseFromString(bytes)) break;
        const grpc::Status status = server.Checkpoint(nullptr, &request, &response);
        check_status(status, "Checkpoint");
        if (status.ok()) check(before == request.job_id(), "Checkpoint OK for another job");
        break;
      }
      default: {
        pb::ShutdownRequest request;
        pb::ShutdownResponse response;
        if (!request.ParseFromString(bytes)) break;
        const grpc::Status status = server.Shutdown(nullptr, &request, &response);
        check_status(status, "Shutdown");
        if (status.ok()) check(!server.current_job().has_value(), "Shutdown OK but still in a job");
        break;
      }
    }
  }
  (void)exit_requested;
}

}  // namespace
}  // namespace loopmoe::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  loopmoe::fuzz::fuzz_session(data, size);
  return 0;
}
