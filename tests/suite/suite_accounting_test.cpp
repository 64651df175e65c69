// The suite's accounting, checked by running this binary's SuiteWorker cases as a child with a
// results folder of their own: what each case records (tests/support/test_main.cpp), what
// PTK_SKIP_WITHOUT does with and without PTK_REQUIRE (tests/support/test_util.h), and what
// scripts/test_summary.sh makes of the results.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>
#include <string>

#include "tests/parallel/spawn.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

// The child's cases: run only with PTK_TEST_CHILD=1 (spawn_worker sets it).
TEST(SuiteWorker, Passes) { SUCCEED(); }
TEST(SuiteWorker, SkipsForWantOfAProbe) { PTK_SKIP_WITHOUT("probe") << "no probe on this machine"; }

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

struct ChildRun {
  int exit_code;
  std::string log, results;
};

ChildRun run_child(const test::TempDir& d, const std::string& filter, const std::string& require) {
  const std::string dir = d.file("results");  // one child per test (and TempDir)
  auto c = test::spawn_worker(filter, {"PTK_TEST_RESULTS_DIR=" + dir, "PTK_REQUIRE=" + require}, d.file("log"));
  int rc = test::wait_child(c, 60);
  return {rc, slurp(d.file("log")), slurp(dir + "/suite_accounting_test.tsv")};
}

TEST(SuiteAccounting, SkipIsRecordedWithItsReasonAndAnAllSkippedRunSaysSo) {
  test::TempDir d;
  auto r = run_child(d, "SuiteWorker.SkipsForWantOfAProbe", "venv,shared");
  EXPECT_EQ(r.exit_code, 0) << r.log;
  EXPECT_EQ(r.results, "skipped\tsuite_accounting_test\tSuiteWorker.SkipsForWantOfAProbe\t[probe] no probe on this machine\n");
  // ctest's SKIP_REGULAR_EXPRESSION (cmake/PtkHelpers.cmake) matches this line.
  EXPECT_NE(r.log.find("ptk-test: every test of this executable skipped"), std::string::npos) << r.log;
}

TEST(SuiteAccounting, RequiredResourceTurnsTheSkipIntoAFailure) {
  test::TempDir d;
  auto r = run_child(d, "SuiteWorker.SkipsForWantOfAProbe", "venv,probe");
  EXPECT_EQ(r.exit_code, 1) << r.log;
  EXPECT_EQ(r.results.rfind("failed\tsuite_accounting_test\tSuiteWorker.SkipsForWantOfAProbe\t", 0), 0u) << r.results;
  EXPECT_NE(r.log.find("PTK_REQUIRE lists \"probe\""), std::string::npos) << r.log;
  EXPECT_NE(r.log.find("no probe on this machine"), std::string::npos) << r.log;
  EXPECT_EQ(r.log.find("every test of this executable skipped"), std::string::npos) << r.log;
}

TEST(SuiteAccounting, MixedRunIsNotReportedAsSkippedAndTheSummaryCountsEachKind) {
  test::TempDir d;
  auto r = run_child(d, "SuiteWorker.*", "");
  EXPECT_EQ(r.exit_code, 0) << r.log;
  EXPECT_EQ(r.log.find("every test of this executable skipped"), std::string::npos) << r.log;
  EXPECT_NE(r.results.find("passed\tsuite_accounting_test\tSuiteWorker.Passes\t\n"), std::string::npos) << r.results;
  // scripts/test_summary.sh over this run's results plus one failed case of another executable.
  const std::string build = d.file("build");
  d.write("build/test-results/suite_accounting_test.tsv", r.results);
  d.write("build/test-results/other_test.tsv", "failed\tother_test\tOther.Case\t\npassed\tother_test\tOther.Two\t\n");
  auto s = test::run("bash " + test::source_dir() + "/scripts/test_summary.sh " + build);
  EXPECT_EQ(s.exit_code, 1) << s.out;
  EXPECT_NE(s.out.find("test summary: 2 passed, 1 skipped, 1 failed (GoogleTest and unittest cases of 2 executables)"),
            std::string::npos) << s.out;
  EXPECT_NE(s.out.find("  1  [probe] no probe on this machine\n       suite_accounting_test:SuiteWorker.SkipsForWantOfAProbe"),
            std::string::npos) << s.out;
  EXPECT_NE(s.out.find("failed:\n  other_test: Other.Case"), std::string::npos) << s.out;
  d.write("build/test-results/other_test.tsv", "passed\tother_test\tOther.Two\t\n");
  auto ok = test::run("bash " + test::source_dir() + "/scripts/test_summary.sh " + build);
  EXPECT_EQ(ok.exit_code, 0) << ok.out;
}

// Without PTK_TEST_CHILD, *Worker suites are filtered out of an ordinary run (they are rank bodies).
TEST(SuiteAccounting, WorkerSuitesDoNotRunOutsideAChild) {
  test::TempDir d;
  auto r = test::run("env -u PTK_TEST_CHILD PTK_TEST_RESULTS_DIR=" + d.path() + " " + test::self_exe() +
                     " --gtest_filter='SuiteWorker.*'");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("Running 0 tests"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace ptk
