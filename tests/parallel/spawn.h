// Multi-process test helpers: a free loopback port, starting this test binary (or any program) as
// a child with extra environment and its output in a log file, and waiting with a deadline.
// Not a launcher for users (that is `ptk launch`). Children are exec'd right after fork.
#pragma once
#include <sys/types.h>

#include <string>
#include <vector>

namespace ptk::test {

// A TCP port that was free on 127.0.0.1 a moment ago.
int free_port();
// Path of the running executable.
std::string self_exe();

struct Child {
  pid_t pid = -1;
  std::string log;  // stdout and stderr
};
// fork + exec `argv` with the current environment plus `env` (NAME=VALUE entries).
Child spawn(const std::vector<std::string>& argv, const std::vector<std::string>& env, const std::string& log);
// What makes a run of a test binary a child of another test (NAME=VALUE entries): tests/support/
// test_main.cpp runs its *Worker suites (PTK_TEST_CHILD) and it writes no results file of its own
// (an empty PTK_TEST_RESULTS_DIR), its cases being the parent's.
std::vector<std::string> child_env();
// Runs this binary's test `filter` (e.g. "DistWorker.Main") as a child (child_env(), unless `env`
// names its own PTK_TEST_RESULTS_DIR): how tests start ranks.
Child spawn_worker(const std::string& filter, const std::vector<std::string>& env, const std::string& log);
// Waits up to timeout_s; returns the exit code, 128+signal when killed by a signal, or -1 after
// killing a child that overran the deadline.
int wait_child(Child& c, double timeout_s);
// torchrun's variables for rank `rank` of `world` on loopback.
std::vector<std::string> rank_env(int rank, int world, int port);

}  // namespace ptk::test
