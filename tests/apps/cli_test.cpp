// The `ptk` binary: help, unknown and unbuilt commands, exit codes.
#include <gtest/gtest.h>

#include <sstream>

#include "tests/support/test_util.h"

namespace ptk {
namespace {

using test::run;

TEST(Cli, HelpListsEveryDesignCommand) {
  auto r = run(test::ptk_binary() + " --help");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  for (const char* c : {"sft", "dpo", "grpo", "rm", "reward-server", "generate", "prepare", "tokenize", "forward",
                        "eval", "make-data", "launch", "pipeline", "sweep", "plot"})
    EXPECT_NE(r.out.find(std::string("\n  ") + c + " "), std::string::npos) << c << "\n" << r.out;
}

TEST(Cli, UnknownCommandSuggests) {
  auto r = run(test::ptk_binary() + " tokenise");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.out.find("did you mean `tokenize`"), std::string::npos) << r.out;
}

TEST(Cli, InfoPrintsBannerAndHonoursThreads) {
  auto r = run(test::ptk_binary() + " info --threads 1 --matmul-size 64");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("| 1 threads (flag) | BLAS "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("GFLOP/s"), std::string::npos) << r.out;
  auto env = run("OMP_NUM_THREADS=1 " + test::ptk_binary() + " info --matmul-size 0");
  EXPECT_NE(env.out.find("1 threads (OMP_NUM_THREADS)"), std::string::npos) << env.out;
}

TEST(Cli, UnknownFlagIsAUsageError) {
  auto r = run(test::ptk_binary() + " info --bogus");
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.out.find("ptk info --help"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace ptk

namespace ptk {
namespace {

// Whatever is not built yet says so and exits 2 (the list shrinks as stages land).
TEST(Cli, UnbuiltCommandsSaySoAndExit2) {
  auto help = test::run(test::ptk_binary() + " --help");
  std::istringstream lines(help.out);
  std::string line;
  int unbuilt = 0;
  while (std::getline(lines, line)) {
    if (line.find("[not built yet]") == std::string::npos) continue;
    std::string name = line.substr(2, line.find(' ', 2) - 2);
    auto r = test::run(test::ptk_binary() + " " + name + " --help");
    EXPECT_EQ(r.exit_code, 2) << name;
    EXPECT_NE(r.out.find("not built yet"), std::string::npos) << r.out;
    ++unbuilt;
  }
  RecordProperty("unbuilt", unbuilt);
}

}  // namespace
}  // namespace ptk
