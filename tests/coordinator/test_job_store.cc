// The coordinator's job store, and schedules and job files (pure functions).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "coordinator/coordinator.h"
#include "coordinator/job_spec.h"
#include "coordinator/job_store.h"
#include "fake_process.h"
#include "model/error.h"

namespace loopmoe::coordinator {
namespace {

using testing::TempDir;
using testing::test_config;
using testing::test_options;

// ------------------------------------------------------------------------------------------------
// Job store

TEST(JobStore, RoundTripAndReopen) {
  TempDir dir;
  v1::JobStatus job;
  {
    JobStore store((dir.path / "db").string());
    EXPECT_EQ(store.next_job_id(), "1");
    EXPECT_EQ(store.next_job_id(), "2");
    job.set_job_id("2");
    job.set_state(v1::RUNNING);
    job.mutable_spec()->set_name("tiny");
    job.set_step(40);
    store.put_job(job);
    v1::JobStatus ten = job;
    ten.set_job_id("10");  // numeric order, not text order
    store.put_job(ten);
    EXPECT_EQ(store.append_log("2", "first", 1), 0);
    EXPECT_EQ(store.append_log("2", "second", 2), 1);
    EXPECT_EQ(store.append_log("10", "other job", 3), 0);
    v1::CheckpointMeta meta;
    meta.set_job_id("2");
    meta.set_step(20);
    meta.add_files()->set_path("/x/worker-0.bin");
    store.put_checkpoint(meta);
    meta.set_step(100);
    store.put_checkpoint(meta);
  }
  JobStore store((dir.path / "db").string());
  EXPECT_EQ(store.next_job_id(), "3");
  std::optional<v1::JobStatus> back = store.get_job("2");
  ASSERT_TRUE(back);
  EXPECT_EQ(back->spec().name(), "tiny");
  EXPECT_EQ(back->step(), 40);
  EXPECT_FALSE(store.get_job("7"));
  EXPECT_FALSE(store.get_job("not-a-number"));
  std::vector<v1::JobStatus> jobs = store.list_jobs();
  ASSERT_EQ(jobs.size(), 2u);
  EXPECT_EQ(jobs[0].job_id(), "2");
  EXPECT_EQ(jobs[1].job_id(), "10");
  EXPECT_EQ(store.log_size("2"), 2);
  EXPECT_EQ(store.append_log("2", "third", 4), 2);  // the counter survives the reopen
  std::vector<v1::LogLine> lines = store.read_log("2", 1, 100);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0].text(), "second");
  EXPECT_EQ(lines[1].text(), "third");
  EXPECT_EQ(lines[1].line(), 2);
  std::vector<v1::CheckpointMeta> ckpts = store.list_checkpoints("2");
  ASSERT_EQ(ckpts.size(), 2u);
  EXPECT_EQ(ckpts[0].step(), 20);
  EXPECT_EQ(ckpts[1].step(), 100);
  EXPECT_EQ(ckpts[1].files(0).path(), "/x/worker-0.bin");
  EXPECT_TRUE(store.list_checkpoints("10").empty());
}

TEST(JobStore, CorruptDatabaseNamesThePath) {
  TempDir dir;
  const std::string db = (dir.path / "db").string();
  { JobStore store(db); }
  std::ofstream(db + "/CURRENT", std::ios::trunc) << "garbage\n";
  try {
    JobStore store(db);
    FAIL() << "opened a corrupt database";
  } catch (const StoreError& e) {
    EXPECT_NE(std::string(e.what()).find(db + ": cannot open the coordinator database"),
              std::string::npos)
        << e.what();
  }
}

TEST(JobStore, SecondCoordinatorOnSameDirFailsClearly) {
  TempDir dir;
  Coordinator first(test_options(dir.path));
  try {
    Coordinator second(test_options(dir.path));
    FAIL() << "two coordinators opened one database";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("cannot open the coordinator database"), std::string::npos)
        << e.what();
  }
}

// ------------------------------------------------------------------------------------------------
// Schedules and chunks (pure functions)

TEST(Schedule, LoopsAndChunks) {
  v1::LoopSchedule s;
  EXPECT_EQ(loops_for_step(s, 4, 17), 4);
  s.set_kind(v1::LoopSchedule::LIST);
  for (int r : {1, 2, 3}) s.add_loops(r);
  EXPECT_EQ(loops_for_step(s, 4, 0), 1);
  EXPECT_EQ(loops_for_step(s, 4, 4), 2);
  EXPECT_EQ(loops_for_step(s, 4, 8), 3);
  v1::LoopSchedule u;
  u.set_kind(v1::LoopSchedule::UNIFORM);
  u.set_min_loops(2);
  u.set_max_loops(5);
  u.set_seed(7);
  std::set<int> seen;
  for (int64_t i = 0; i < 200; ++i) {
    const int r = loops_for_step(u, 1, i);
    EXPECT_GE(r, 2);
    EXPECT_LE(r, 5);
    EXPECT_EQ(r, loops_for_step(u, 1, i));
    seen.insert(r);
  }
  EXPECT_EQ(seen.size(), 4u);
  u.set_seed(8);
  int same = 0;
  for (int64_t i = 0; i < 200; ++i)
    same += loops_for_step(u, 1, i) == [&] {
      v1::LoopSchedule v = u;
      v.set_seed(7);
      return loops_for_step(v, 1, i);
    }();
  EXPECT_LT(same, 150);  // the seed matters

  model::TrainConfig t;
  t.steps = 120;
  t.log_interval = 7;
  t.eval_interval = 0;
  t.checkpoint_interval = 25;
  EXPECT_EQ(next_chunk_end(t, 0), 7);
  EXPECT_EQ(next_chunk_end(t, 21), 25);
  EXPECT_EQ(next_chunk_end(t, 119), 120);
  t.log_interval = 1000;
  t.checkpoint_interval = 0;
  EXPECT_EQ(next_chunk_end(t, 0), 50);
  EXPECT_EQ(next_chunk_end(t, 100), 120);
  EXPECT_TRUE(eval_due(t, 120));
  EXPECT_FALSE(eval_due(t, 100));
  EXPECT_TRUE(checkpoint_due(t, 120));
}

TEST(Schedule, ParseJobFile) {
  const std::string text = test_config(20, 5, 10, 10) +
                           "\n[job]\nname = \"tiny\"\nworkers = 2\nshards = 3\nthreads = 2\n"
                           "output_dir = \"out\"\n[job.schedule]\nkind = \"list\"\n"
                           "loops = [1, 3]\n";
  v1::JobSpec spec = parse_job_file(text, "job.toml", "/home/me");
  EXPECT_EQ(spec.name(), "tiny");
  EXPECT_EQ(spec.num_workers(), 2);
  EXPECT_EQ(spec.num_shards(), 3);
  EXPECT_EQ(spec.threads(), 2);
  EXPECT_EQ(spec.output_dir(), "/home/me/out");
  EXPECT_EQ(spec.schedule().kind(), v1::LoopSchedule::LIST);
  ASSERT_EQ(spec.schedule().loops_size(), 2);
  EXPECT_EQ(spec.schedule().loops(1), 3);
  EXPECT_EQ(spec.config_toml().find("[job"), std::string::npos);
  model::Config c = model::parse_config(spec.config_toml(), "x");
  EXPECT_EQ(c.data.dir, "/nonexistent/data");
  EXPECT_EQ(c.train.steps, 20);
  // Relative data.dir becomes absolute.
  v1::JobSpec rel = parse_job_file("[data]\ndir = \"data/sotu\"\n", "j.toml", "/home/me");
  EXPECT_EQ(model::parse_config(rel.config_toml(), "x").data.dir, "/home/me/data/sotu");
  try {
    parse_job_file(text + "workerz = 1\n", "job.toml", "/");
    FAIL();
  } catch (const model::ConfigError& e) {
    EXPECT_STREQ(e.what(), "job.toml: unknown key job.schedule.workerz");
  }
  try {
    parse_job_file("[job]\nworkers = 1\n[job.schedule]\nkind = \"random\"\n", "job.toml", "/");
    FAIL();
  } catch (const model::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("job.schedule.kind = 'random'"), std::string::npos);
  }
  // A loop count that does not fit is refused, not wrapped (2^32 + 1 would read as 1).
  try {
    parse_job_file("[job.schedule]\nkind = \"list\"\nloops = [4294967297]\n", "job.toml", "/");
    FAIL();
  } catch (const model::ConfigError& e) {
    EXPECT_STREQ(e.what(), "job.toml: job.schedule.loops is out of range");
  }
}

}  // namespace
}  // namespace loopmoe::coordinator
