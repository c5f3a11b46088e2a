// Crash consistency of a distributed checkpoint round (issue 11 item 3): the job's processes are
// killed together (one fork()ed child holds them all as threads) while one shard writes its file
// of the second checkpoint, at each point of the atomic write (common/atomic_file.h's hook). The
// child records the metadata by the coordinator's commit rule (coordinator/job_driver.cc: one
// record, written after every process answered Checkpoint with its file's checksum); afterwards
// the committed metadata names only files that verify against their recorded checksums, and the
// job resumes from it.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "common/atomic_file.h"
#include "runtime/process_checkpoint.h"
#include "tests/cluster/cluster_fixture.h"

namespace loopmoe::runtime::testing {
namespace {

// The committed metadata: "step seed epoch index" then one "role rank xxh64 bytes path" per file.
std::string serialize(const ResumePoint& p) {
  std::ostringstream os;
  os << p.step << ' ' << p.sampler.seed << ' ' << p.sampler.epoch << ' ' << p.sampler.index << '\n';
  for (const CheckpointFileRef& f : p.files) {
    os << static_cast<int>(f.role) << ' ' << f.rank << ' ' << f.xxh64 << ' ' << f.bytes << ' '
       << f.path << '\n';
  }
  return os.str();
}

ResumePoint deserialize(const fs::path& path) {
  std::ifstream in(path);
  ResumePoint p;
  in >> p.step >> p.sampler.seed >> p.sampler.epoch >> p.sampler.index;
  int role = 0;
  CheckpointFileRef f;
  while (in >> role >> f.rank >> f.xxh64 >> f.bytes >> f.path) {
    f.role = static_cast<Role>(role);
    p.files.push_back(f);
  }
  return p;
}

TEST_F(ClusterTest, KilledDuringCheckpointRoundCommitsOnlyVerifiedFiles) {
  model::Config c = testing::tiny_loopmoe_config(dir_ / "data");
  c.train.steps = 10;
  c.train.checkpoint_interval = 0;
  c.train.eval_interval = 0;
  for (const char* point : {"after-write", "after-fsync", "before-rename", "after-rename"}) {
    SCOPED_TRACE(point);
    const fs::path job = dir_ / point, meta = job / "committed";
    fs::create_directories(job);
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    if (pid == 0) {
      int code = 0;
      try {
        // Dies in the second round, while shard 1 writes its file.
        common::set_fault_injection(
            common::parse_fault_injection(std::string(point) + ":2:shard-1.bin"));
        ThreadCluster cluster(c, 2, 2);
        for (int round = 1; round <= 2; ++round) {
          cluster.steps(2, c.model.n_loops);
          const ResumePoint p = cluster.checkpoint(job / ("step-" + std::to_string(2 * round)));
          common::write_file_atomically(meta, serialize(p));  // the commit rule
        }
      } catch (const std::exception& e) {
        std::fprintf(stderr, "child: %s\n", e.what());
        code = 1;
      }
      std::fflush(nullptr);
      ::_exit(code);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
        << (WIFEXITED(status) ? "exited with " + std::to_string(WEXITSTATUS(status)) : "");
    // The second round wrote (some) files but committed nothing: the metadata is the first
    // round's, and each file it names verifies against its recorded checksum.
    const ResumePoint committed = deserialize(meta);
    ASSERT_EQ(committed.step, 2);
    ASSERT_EQ(committed.files.size(), 4u);
    for (const CheckpointFileRef& f : committed.files) {
      EXPECT_NE(f.path.find("step-2/"), std::string::npos) << f.path;
      if (f.role == Role::kWorker) {
        EXPECT_NO_THROW(read_worker_checkpoint(f.path, f.xxh64)) << f.path;
      } else {
        EXPECT_NO_THROW(read_shard_checkpoint(f.path, f.xxh64)) << f.path;
      }
    }
    // The job resumes from the committed checkpoint, the killed round's leftovers beside it.
    ThreadCluster resumed(c, 2, 2, committed);
    const std::vector<StepReport> r = resumed.steps(1, c.model.n_loops);
    EXPECT_EQ(r[0].step, 3);
    EXPECT_TRUE(std::isfinite(r[0].loss));
  }
}

}  // namespace
}  // namespace loopmoe::runtime::testing
