#include "coordinator/job_store.h"

#include <rocksdb/db.h>
#include <rocksdb/options.h>

#include <cstdio>
#include <filesystem>

namespace loopmoe::coordinator {
namespace {

// Keys (docs/SERVICE.md):
//   meta/next_job_id            decimal counter
//   meta/next_process_id        decimal counter
//   job/<id:20>                 JobStatus
//   log/<id:20>/<line:20>       LogLine
//   ckpt/<id:20>/<step:20>      CheckpointMeta
constexpr char kNextJobId[] = "meta/next_job_id";
constexpr char kNextProcessId[] = "meta/next_process_id";

std::string pad20(int64_t x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%020lld", static_cast<long long>(x));
  return buf;
}

rocksdb::WriteOptions synced() {
  rocksdb::WriteOptions options;
  options.sync = true;
  return options;
}

}  // namespace

std::string padded_key_part(const std::string& decimal) {
  // Ids that are not plain decimals (typed by a user) keep their text: they are simply not found.
  if (decimal.empty() || decimal.size() > 18 ||
      decimal.find_first_not_of("0123456789") != std::string::npos) {
    return "x" + decimal;
  }
  return pad20(std::stoll(decimal));
}

JobStore::JobStore(const std::string& path) : path_(path) {
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  if (ec) throw StoreError(path + ": cannot create the coordinator database: " + ec.message());
  rocksdb::Options options;
  options.create_if_missing = true;
  options.paranoid_checks = true;
  rocksdb::DB* db = nullptr;
  const rocksdb::Status s = rocksdb::DB::Open(options, path, &db);
  if (!s.ok()) {
    throw StoreError(path + ": cannot open the coordinator database: " + s.ToString());
  }
  db_.reset(db);
}

JobStore::~JobStore() {
  if (db_) (void)db_->Close();
}

void JobStore::put(const std::string& key, const std::string& value) {
  const rocksdb::Status s = db_->Put(synced(), key, value);
  if (!s.ok()) throw StoreError(path_ + ": write of '" + key + "' failed: " + s.ToString());
}

std::optional<std::string> JobStore::get(const std::string& key) {
  std::string value;
  const rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), key, &value);
  if (s.IsNotFound()) return std::nullopt;
  if (!s.ok()) throw StoreError(path_ + ": read of '" + key + "' failed: " + s.ToString());
  return value;
}

template <class Message>
std::vector<Message> JobStore::scan(const std::string& prefix, int64_t max) {
  std::vector<Message> out;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
    if (max >= 0 && static_cast<int64_t>(out.size()) >= max) break;
    Message m;
    if (!m.ParseFromArray(it->value().data(), static_cast<int>(it->value().size()))) {
      throw StoreError(path_ + ": corrupt record under key '" + it->key().ToString() + "'");
    }
    out.push_back(std::move(m));
  }
  if (!it->status().ok()) {
    throw StoreError(path_ + ": scan of '" + prefix + "' failed: " + it->status().ToString());
  }
  return out;
}

std::string JobStore::next_job_id() {
  absl::MutexLock lock(&mu_);
  int64_t next = 1;
  if (auto v = get(kNextJobId)) next = std::stoll(*v);
  put(kNextJobId, std::to_string(next + 1));
  return std::to_string(next);
}

int64_t JobStore::next_process_id() {
  const std::optional<std::string> v = get(kNextProcessId);
  return v ? std::stoll(*v) : 1;
}

void JobStore::set_next_process_id(int64_t next) { put(kNextProcessId, std::to_string(next)); }

void JobStore::put_job(const v1::JobStatus& job) {
  put("job/" + padded_key_part(job.job_id()), job.SerializeAsString());
}

std::optional<v1::JobStatus> JobStore::get_job(const std::string& job_id) {
  const std::string key = "job/" + padded_key_part(job_id);
  auto value = get(key);
  if (!value) return std::nullopt;
  v1::JobStatus job;
  if (!job.ParseFromString(*value)) {
    throw StoreError(path_ + ": corrupt record under key '" + key + "'");
  }
  return job;
}

std::vector<v1::JobStatus> JobStore::list_jobs() { return scan<v1::JobStatus>("job/"); }

int64_t JobStore::log_size(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  return log_size_locked(job_id);
}

int64_t JobStore::log_size_locked(const std::string& job_id) {
  auto found = log_sizes_.find(job_id);
  if (found != log_sizes_.end()) return found->second;
  // Not cached yet (e.g. after a restart): the last key under the job's prefix.
  const std::string prefix = "log/" + padded_key_part(job_id) + "/";
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  it->SeekForPrev(prefix + "~");
  int64_t size = 0;
  if (it->Valid() && it->key().starts_with(prefix)) {
    size = std::stoll(it->key().ToString().substr(prefix.size())) + 1;
  }
  log_sizes_[job_id] = size;
  return size;
}

int64_t JobStore::append_log(const std::string& job_id, const std::string& text, int64_t unix_ms) {
  absl::MutexLock lock(&mu_);  // one writer at a time per index
  const int64_t line = log_size_locked(job_id);
  v1::LogLine record;
  record.set_line(line);
  record.set_unix_ms(unix_ms);
  record.set_text(text);
  put("log/" + padded_key_part(job_id) + "/" + pad20(line), record.SerializeAsString());
  log_sizes_[job_id] = line + 1;
  return line;
}

std::vector<v1::LogLine> JobStore::read_log(const std::string& job_id, int64_t from_line,
                                            int64_t max_lines) {
  const std::string prefix = "log/" + padded_key_part(job_id) + "/";
  std::vector<v1::LogLine> out;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  for (it->Seek(prefix + pad20(std::max<int64_t>(from_line, 0)));
       it->Valid() && it->key().starts_with(prefix) && static_cast<int64_t>(out.size()) < max_lines;
       it->Next()) {
    v1::LogLine line;
    if (!line.ParseFromArray(it->value().data(), static_cast<int>(it->value().size()))) {
      throw StoreError(path_ + ": corrupt record under key '" + it->key().ToString() + "'");
    }
    out.push_back(std::move(line));
  }
  return out;
}

void JobStore::put_checkpoint(const v1::CheckpointMeta& meta) {
  put("ckpt/" + padded_key_part(meta.job_id()) + "/" + pad20(meta.step()),
      meta.SerializeAsString());
}

std::vector<v1::CheckpointMeta> JobStore::list_checkpoints(const std::string& job_id) {
  return scan<v1::CheckpointMeta>("ckpt/" + padded_key_part(job_id) + "/");
}

}  // namespace loopmoe::coordinator
