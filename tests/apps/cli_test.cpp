// The `ptk` binary: help, unknown commands and flags, exit codes.
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

// Every command `ptk --help` lists answers its own --help: exit 0 and a usage line naming it.
TEST(Cli, EveryListedCommandHasHelp) {
  auto help = test::run(test::ptk_binary() + " --help");
  ASSERT_EQ(help.exit_code, 0) << help.out;
  std::istringstream lines(help.out.substr(help.out.find("commands:\n")));
  std::string line;
  std::getline(lines, line);  // "commands:"
  int listed = 0;
  while (std::getline(lines, line) && line.rfind("  ", 0) == 0) {
    std::string name = line.substr(2, line.find(' ', 2) - 2);
    auto r = test::run(test::ptk_binary() + " " + name + " --help");
    EXPECT_EQ(r.exit_code, 0) << name << "\n" << r.out;
    EXPECT_NE(r.out.find("ptk " + name), std::string::npos) << name << "\n" << r.out;
    ++listed;
  }
  EXPECT_EQ(listed, 19) << help.out;  // commands.cpp's table (merge-lora and plan since issue 28)
}

}  // namespace
}  // namespace ptk
