// Run folder lock and the cleanup of crashed writers' temporaries, with the leftovers made by hand:
// what is removed (dead writer, or no pid under the lock), what stays (a live pid; no pid without
// the lock; a folder moved aside whose original is missing; everything that is not a temporary),
// the log lines with sizes, the lock between processes, and a killed holder releasing it.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

#include "core/train/run_folder.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

// A pid that was alive and is now dead (a reaped child's).
long dead_pid() {
  pid_t p = ::fork();
  if (p == 0) ::_exit(0);
  ::waitpid(p, nullptr, 0);
  return p;
}

// A child that lives until the test kills it.
struct LiveChild {
  pid_t pid = ::fork();
  LiveChild() {
    if (pid == 0) {
      ::pause();
      ::_exit(0);
    }
  }
  ~LiveChild() {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
  }
};

void file_of(const std::string& path, size_t bytes) {
  make_dirs(parent_dir(path));
  write_file_atomic(path, std::string(bytes, 'x'));
}

std::vector<std::string> lines;
void collect(const std::string& line) { lines.push_back(line); }

bool has_line(const std::string& part) {
  return std::any_of(lines.begin(), lines.end(), [&](const std::string& l) { return l.find(part) != std::string::npos; });
}

// The layout a crashed 72B run leaves, in miniature, next to what must never go.
struct Layout {
  test::TempDir d;
  std::string run = d.file("run");
  long dead = dead_pid();
  LiveChild live;
  Layout() {
    file_of(run + "/final.tmp/model.safetensors", 3000);                                    // trainer's, no pid
    file_of(run + "/final.tmp.tmp-" + std::to_string(dead) + "/model.safetensors", 2 << 20);  // save_checkpoint's
    file_of(run + "/checkpoints/.tmp-step-7/model.tmp.tmp-" + std::to_string(dead) + "/x", 1000);
    file_of(run + "/checkpoints/.trash-step-3/model.safetensors", 10);
    file_of(run + "/config.json.tmp." + std::to_string(dead), 10);                          // write_file_atomic's
    file_of(run + "/data/train.tmp-" + std::to_string(live.pid) + "/tokens-00000.u32", 10);  // a live writer's
    file_of(run + "/data/train-ref_logps-0123.safetensors.tmp-" + std::to_string(::getpid()), 10);  // our own pid
    file_of(run + "/final.old/config.json", 10);                    // moved aside; final/ exists: stale
    file_of(run + "/checkpoints/step-9.old/config.json", 10);       // moved aside; step-9 missing: the only copy
    // Not temporaries: kept whatever happens.
    file_of(run + "/final/model.safetensors", 10);
    file_of(run + "/checkpoints/step-5/DONE", 2);
    file_of(run + "/metrics.jsonl", 10);
    file_of(run + "/notes.old", 10);
    file_of(run + "/notes", 10);
    file_of(run + "/data/train/manifest.json", 10);
    file_of(run + "/rollouts/step-1.jsonl", 10);
  }
  std::vector<std::string> kept_always() const {
    return {"final/model.safetensors", "checkpoints/step-5/DONE", "metrics.jsonl", "notes.old", "notes",
            "data/train/manifest.json", "rollouts/step-1.jsonl",
            "data/train.tmp-" + std::to_string(live.pid), "checkpoints/step-9.old"};
  }
};

TEST(RunFolder, UnderTheLockEveryDeadWritersTemporaryGoes) {
  Layout l;
  std::vector<Leftover> got = clean_leftovers(l.run, true);
  for (const char* gone : {"final.tmp", "checkpoints/.tmp-step-7", "checkpoints/.trash-step-3", "final.old"})
    EXPECT_FALSE(path_exists(l.run + "/" + gone)) << gone;
  EXPECT_FALSE(path_exists(l.run + "/final.tmp.tmp-" + std::to_string(l.dead)));
  EXPECT_FALSE(path_exists(l.run + "/config.json.tmp." + std::to_string(l.dead)));
  EXPECT_FALSE(path_exists(l.run + "/data/train-ref_logps-0123.safetensors.tmp-" + std::to_string(::getpid())));
  for (const auto& k : l.kept_always()) EXPECT_TRUE(path_exists(l.run + "/" + k)) << k;
  // One entry per temporary found, with its size and what happened to it.
  ASSERT_EQ(got.size(), 9u);
  int removed = 0;
  for (const auto& x : got) {
    removed += x.action == Leftover::Action::kRemoved;
    if (x.path == l.run + "/final.tmp.tmp-" + std::to_string(l.dead)) {
      EXPECT_EQ(x.bytes, 2u << 20);
      EXPECT_EQ(describe(x), "removed leftover " + x.path + " (2.00 MiB) of a run that crashed or was killed");
    }
    if (x.path == l.run + "/data/train.tmp-" + std::to_string(l.live.pid)) {
      EXPECT_EQ(x.action, Leftover::Action::kKept);
      EXPECT_NE(describe(x).find("pid " + std::to_string(l.live.pid) + ", is alive on this host"), std::string::npos);
    }
    if (x.path == l.run + "/checkpoints/step-9.old") {
      EXPECT_EQ(x.action, Leftover::Action::kKept);
      EXPECT_NE(x.why.find("it may hold the only copy"), std::string::npos);
    }
  }
  EXPECT_EQ(removed, 7);
}

TEST(RunFolder, WithoutTheLockOnlyDeadPidsGo) {
  Layout l;
  std::vector<Leftover> got = clean_leftovers(l.run, false);
  EXPECT_FALSE(path_exists(l.run + "/final.tmp.tmp-" + std::to_string(l.dead)));
  EXPECT_FALSE(path_exists(l.run + "/config.json.tmp." + std::to_string(l.dead)));
  // No pid in the name: a writer on another host cannot be ruled out.
  for (const char* kept : {"final.tmp", "checkpoints/.tmp-step-7", "checkpoints/.trash-step-3", "final.old"})
    EXPECT_TRUE(path_exists(l.run + "/" + kept)) << kept;
  for (const auto& k : l.kept_always()) EXPECT_TRUE(path_exists(l.run + "/" + k)) << k;
  for (const auto& x : got) {
    if (x.path == l.run + "/final.tmp") {
      EXPECT_NE(x.why.find("could not be locked"), std::string::npos) << x.why;
    }
  }
}

TEST(RunFolder, LockIsExclusiveAndNamesItsHolder) {
  test::TempDir d;
  {
    RunFolderLock a(d.file("run"));
    ASSERT_EQ(a.state(), RunFolderLock::State::kHeld);
    RunFolderLock b(d.file("run"));  // another open file: flock refuses it even in this process
    EXPECT_EQ(b.state(), RunFolderLock::State::kBusy);
    EXPECT_EQ(b.holder().rfind("pid " + std::to_string(::getpid()) + " on host ", 0), 0u) << b.holder();
  }
  RunFolderLock c(d.file("run"));  // released with `a`
  EXPECT_EQ(c.state(), RunFolderLock::State::kHeld);
}

// What a training command does at start: refuses a folder another process holds; once that process
// is killed (the kernel drops its lock) it takes the folder, removes the leftovers and logs each.
TEST(RunFolder, ClaimAfterTheHolderIsKilled) {
  Layout l;
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  pid_t holder = ::fork();
  if (holder == 0) {
    RunFolderLock lock(l.run);
    char c = lock.state() == RunFolderLock::State::kHeld ? 'y' : 'n';
    if (::write(ready[1], &c, 1) != 1) ::_exit(1);
    ::pause();
    ::_exit(0);
  }
  char c = 0;
  ASSERT_EQ(::read(ready[0], &c, 1), 1);
  ASSERT_EQ(c, 'y');
  try {
    claim_run_folder(l.run, collect);
    ADD_FAILURE() << "claimed a folder another process holds";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("is in use by another ptk process (pid " + std::to_string(holder) + " on host"),
              std::string::npos)
        << e.what();
  }
  EXPECT_TRUE(path_exists(l.run + "/final.tmp"));  // nothing removed while it was held
  ::kill(holder, SIGKILL);
  ::waitpid(holder, nullptr, 0);
  lines.clear();
  claim_run_folder(l.run, collect);
  EXPECT_FALSE(path_exists(l.run + "/final.tmp"));
  EXPECT_TRUE(has_line("removed leftover " + l.run + "/checkpoints/.tmp-step-7 (1000 B)")) << ::testing::PrintToString(lines);
  EXPECT_TRUE(has_line("WARNING: kept leftover " + l.run + "/data/train.tmp-" + std::to_string(l.live.pid)));
  EXPECT_TRUE(has_line("run folder " + l.run + ": removed 7 leftovers, "));
  // Held by this process now: a second claim of the same folder does nothing.
  file_of(l.run + "/final.tmp/x", 1);
  lines.clear();
  claim_run_folder(l.run, collect);
  EXPECT_TRUE(lines.empty());
  EXPECT_TRUE(path_exists(l.run + "/final.tmp/x"));
  ::close(ready[0]);
  ::close(ready[1]);
}

}  // namespace
}  // namespace ptk
