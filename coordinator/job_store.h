// The coordinator's durable state in RocksDB: jobs, their log lines, committed checkpoint
// metadata and the job and process id counters (keys: docs/SERVICE.md). Thread-safe.
#pragma once

#include <absl/base/thread_annotations.h>
#include <absl/synchronization/mutex.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "proto/loopmoe.pb.h"

namespace rocksdb {
class DB;
}

namespace loopmoe::coordinator {

class StoreError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class JobStore {
 public:
  // Opens (creating if missing) the database in directory `path`. Throws StoreError naming the
  // path when it cannot be opened (corrupt, locked by another coordinator, not a directory).
  explicit JobStore(const std::string& path);
  ~JobStore();
  JobStore(const JobStore&) = delete;
  JobStore& operator=(const JobStore&) = delete;

  const std::string& path() const { return path_; }

  // A new job id ("1", "2", ...); the counter is written with a synced write.
  std::string next_job_id() ABSL_LOCKS_EXCLUDED(mu_);

  // The number of the next process id ("worker-N", "shard-N"); 1 when never written. Set
  // (synced) at every registration, so a restarted coordinator continues the count instead of
  // handing out ids that processes registered before the restart still hold.
  int64_t next_process_id();
  void set_next_process_id(int64_t next);

  // Jobs (synced writes).
  void put_job(const v1::JobStatus& job);
  std::optional<v1::JobStatus> get_job(const std::string& job_id);
  std::vector<v1::JobStatus> list_jobs();  // by id

  // Log lines of a job: append returns the line's 0-based index.
  int64_t append_log(const std::string& job_id, const std::string& text, int64_t unix_ms)
      ABSL_LOCKS_EXCLUDED(mu_);
  std::vector<v1::LogLine> read_log(const std::string& job_id, int64_t from_line,
                                    int64_t max_lines);
  int64_t log_size(const std::string& job_id) ABSL_LOCKS_EXCLUDED(mu_);

  // Committed checkpoints of a job (synced write), by step.
  void put_checkpoint(const v1::CheckpointMeta& meta);
  std::vector<v1::CheckpointMeta> list_checkpoints(const std::string& job_id);

 private:
  void put(const std::string& key, const std::string& value);
  std::optional<std::string> get(const std::string& key);
  int64_t log_size_locked(const std::string& job_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  template <class Message>
  std::vector<Message> scan(const std::string& prefix, int64_t max = -1);

  std::string path_;
  std::unique_ptr<rocksdb::DB> db_;
  // RocksDB itself is thread-safe; mu_ also makes next_job_id's read-modify-write of the stored
  // counter atomic, and gives each log one appender at a time.
  absl::Mutex mu_;
  std::map<std::string, int64_t> log_sizes_ ABSL_GUARDED_BY(mu_);
};

// Job ids are decimal integers; keys hold them zero-padded so RocksDB's order is numeric order.
std::string padded_key_part(const std::string& decimal);

}  // namespace loopmoe::coordinator
