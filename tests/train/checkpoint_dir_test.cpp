// Crash safety of checkpoint folders: complete/incomplete detection, keep-last pruning, and a
// writer killed with SIGKILL at random moments always leaves the newest complete checkpoint intact.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "core/train/checkpoint_dir.h"
#include "core/util/fs.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

constexpr size_t kPayload = 1 << 20;

void write_payload(const std::string& dir, int64_t step) {
  std::string data(kPayload, static_cast<char>(step % 251));
  std::ofstream(dir + "/weights.bin", std::ios::binary) << data;
  std::ofstream(dir + "/state.json") << "{\"step\": " << step << "}";
}

// A checkpoint is good when both files are whole and agree with its step.
void expect_consistent(const std::string& dir) {
  int64_t step = CheckpointDir::step_of(dir);
  ASSERT_GE(step, 0) << dir;
  std::string w = read_file(dir + "/weights.bin");
  ASSERT_EQ(w.size(), kPayload) << dir;
  EXPECT_EQ(w.find_first_not_of(static_cast<char>(step % 251)), std::string::npos) << dir;
  EXPECT_EQ(read_file(dir + "/state.json"), "{\"step\": " + std::to_string(step) + "}");
}

TEST(CheckpointDir, CommitPrunesAndFindsLatest) {
  test::TempDir d;
  CheckpointDir c(d.file("checkpoints"), 2);
  EXPECT_EQ(c.latest(), "");
  for (int64_t s : {10, 20, 30}) {
    write_payload(c.begin(s), s);
    c.commit(s);
  }
  auto all = c.complete();
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(CheckpointDir::step_of(all[0]), 20);
  EXPECT_EQ(c.latest(), d.file("checkpoints/step-30"));
  EXPECT_EQ(read_file(d.file("checkpoints/latest")), "step-30\n");
  // An unfinished write is invisible.
  write_payload(c.begin(40), 40);
  EXPECT_EQ(c.latest(), d.file("checkpoints/step-30"));
  // Redoing an existing step replaces it.
  write_payload(c.begin(30), 30);
  c.commit(30);
  expect_consistent(c.latest());
}

TEST(CheckpointDir, ReplaceDirAtomicSwapsFinal) {
  test::TempDir d;
  d.write("new1/a.txt", "one");
  replace_dir_atomic(d.file("new1"), d.file("final"));
  EXPECT_EQ(read_file(d.file("final/a.txt")), "one");
  d.write("new2/a.txt", "two");
  replace_dir_atomic(d.file("new2"), d.file("final"));
  EXPECT_EQ(read_file(d.file("final/a.txt")), "two");
  EXPECT_FALSE(path_exists(d.file("new2")));
}

TEST(CheckpointDir, SigkillDuringWritesLeavesLatestComplete) {
  test::TempDir d;
  std::string root = d.file("checkpoints");
  std::mt19937 rng(42);
  int kills = 0;
  for (int round = 0; round < 12; ++round) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      CheckpointDir c(root, 2);
      int64_t start = c.latest().empty() ? 1 : CheckpointDir::step_of(c.latest()) + 1;
      for (int64_t s = start;; ++s) {
        write_payload(c.begin(s), s);
        c.commit(s);
      }
    }
    usleep(5000 + rng() % 60000);
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    kills += WIFSIGNALED(status);
    CheckpointDir c(root, 2);
    std::string latest = c.latest();
    if (latest.empty()) continue;  // killed before the first commit
    expect_consistent(latest);
    for (auto& dir : c.complete()) expect_consistent(dir);
  }
  EXPECT_EQ(kills, 12);
  EXPECT_FALSE(CheckpointDir(root, 2).latest().empty()) << "no checkpoint completed in 12 rounds";
}

}  // namespace
}  // namespace ptk
