// `ptk launch` end to end with tiny shell commands: torchrun's environment per rank, output lines
// prefixed with the rank, a failing rank stopping the others with its exit status, SIGTERM forwarded.
#include <gtest/gtest.h>
#include <sched.h>
#include <signal.h>

#include <chrono>
#include <regex>
#include <thread>

#include "core/util/fs.h"
#include "tests/parallel/spawn.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

int count(const std::string& hay, const std::string& needle) {
  int n = 0;
  for (size_t at = hay.find(needle); at != std::string::npos; at = hay.find(needle, at + 1)) ++n;
  return n;
}

TEST(Launch, GivesEachRankTorchrunsEnvironmentAndPrefixesItsLines) {
  cpu_set_t set;
  sched_getaffinity(0, sizeof set, &set);
  const int omp = std::max(1, CPU_COUNT(&set) / 2);
  auto r = test::run("env -u OMP_NUM_THREADS " + test::ptk_binary() +
                     " launch -n 2 -- sh -c 'echo rank=$RANK world=$WORLD_SIZE local=$LOCAL_RANK/$LOCAL_WORLD_SIZE "
                     "addr=$MASTER_ADDR port=$MASTER_PORT omp=$OMP_NUM_THREADS; echo second line from $RANK'");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  for (int k = 0; k < 2; ++k) {
    std::string rs = std::to_string(k);
    std::regex line("\\[rank " + rs + "\\] rank=" + rs + " world=2 local=" + rs + "/2 addr=127\\.0\\.0\\.1 port=[0-9]+ omp=" +
                    std::to_string(omp) + "\n");
    EXPECT_TRUE(std::regex_search(r.out, line)) << r.out;
    EXPECT_NE(r.out.find("[rank " + rs + "] second line from " + rs + "\n"), std::string::npos) << r.out;
  }
  auto fixed = test::run(test::ptk_binary() + " launch -n 3 --master-port 23457 -- sh -c 'echo port=$MASTER_PORT'");
  EXPECT_EQ(fixed.exit_code, 0) << fixed.out;
  EXPECT_EQ(count(fixed.out, "] port=23457"), 3) << fixed.out;
}

TEST(Launch, FailingRankStopsTheOthersWithItsStatus) {
  auto t0 = std::chrono::steady_clock::now();
  auto r = test::run(test::ptk_binary() +
                     " launch -n 3 --grace-s 5 -- sh -c 'if [ $RANK = 1 ]; then sleep 0.3; echo bye; exit 7; fi; sleep 60'");
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(r.exit_code, 7) << r.out;
  EXPECT_LT(s, 20) << r.out;
  EXPECT_NE(r.out.find("[rank 1] bye"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("rank 1 exited with status 7; stopping the other ranks"), std::string::npos) << r.out;
  // A rank killed by a signal: 128 + signal.
  auto k = test::run(test::ptk_binary() + " launch -n 2 -- sh -c 'if [ $RANK = 0 ]; then kill -9 $$; fi; sleep 60'");
  EXPECT_EQ(k.exit_code, 128 + 9) << k.out;
  // A command that does not exist.
  auto m = test::run(test::ptk_binary() + " launch -n 2 -- /nonexistent/cmd");
  EXPECT_EQ(m.exit_code, 127) << m.out;
  EXPECT_NE(m.out.find("cannot run `/nonexistent/cmd`"), std::string::npos) << m.out;
}

TEST(Launch, ForwardsSigterm) {
  test::TempDir d;
  auto c = test::spawn({test::ptk_binary(), "launch", "-n", "2", "--", "sh", "-c",
                        "trap 'echo got TERM; exit 3' TERM; echo ready; while true; do sleep 0.1; done"},
                       {}, d.file("launch.log"));
  auto t0 = std::chrono::steady_clock::now();
  while (count(read_file(d.file("launch.log")), "] ready") < 2 &&
         std::chrono::steady_clock::now() - t0 < std::chrono::seconds(20))
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ::kill(c.pid, SIGTERM);
  int code = test::wait_child(c, 30);
  std::string log = read_file(d.file("launch.log"));
  EXPECT_EQ(code, 128 + SIGTERM) << log;
  EXPECT_NE(log.find("[rank 0] got TERM"), std::string::npos) << log;
  EXPECT_NE(log.find("[rank 1] got TERM"), std::string::npos) << log;
}

// Real Gloo ranks rendezvous through launch's environment (comm_test's rank body, built beside this
// test, run as a child of a test: spawn.h's child_env()).
TEST(Launch, StartsGlooRanksThatRendezvous) {
  std::string exe = test::self_exe();
  std::string comm_test = exe.substr(0, exe.rfind('/')) + "/comm_test";
  ASSERT_TRUE(path_exists(comm_test)) << comm_test;
  std::string child;
  for (const auto& kv : test::child_env()) child += kv + " ";
  auto r = test::run(child + "PTK_DIST_SCENARIO=collectives PTK_DIST_TIMEOUT=60 " + test::ptk_binary() +
                     " launch -n 2 -- " + comm_test + " --gtest_filter=DistWorker.Main");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("[rank 0] [       OK ] DistWorker.Main"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("[rank 1] [       OK ] DistWorker.Main"), std::string::npos) << r.out;
  // Rank 1 dies (exit 3) mid-run: launch reports it and exits with its status.
  auto f = test::run(child + "PTK_DIST_SCENARIO=peer_dies PTK_DIST_TIMEOUT=20 " + test::ptk_binary() +
                     " launch -n 2 -- " + comm_test + " --gtest_filter=DistWorker.Main");
  EXPECT_EQ(f.exit_code, 3) << f.out;
  EXPECT_NE(f.out.find("rank 1 exited with status 3"), std::string::npos) << f.out;
}

TEST(Launch, UsageErrors) {
  EXPECT_EQ(test::run(test::ptk_binary() + " launch -n 2").exit_code, 2);
  EXPECT_EQ(test::run(test::ptk_binary() + " launch -n 0 -- true").exit_code, 2);
  EXPECT_EQ(test::run(test::ptk_binary() + " launch --help").exit_code, 0);
}

}  // namespace
}  // namespace ptk
