// `ptk make-data` through the binary: files, identical bytes on a rerun, the summary, usage errors.
#include <gtest/gtest.h>

#include "core/util/fs.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

TEST(MakeDataCli, WritesSplitsAndTokenizerReproducibly) {
  test::TempDir d;
  std::string cmd = test::ptk_binary() + " make-data arithmetic --seed 5 --tokenizer bytes --out ";
  auto a = test::run(cmd + d.file("a"));
  ASSERT_EQ(a.exit_code, 0) << a.out;
  EXPECT_NE(a.out.find("9700 train + 300 held-out problems (of 10000 distinct)"), std::string::npos) << a.out;
  EXPECT_NE(a.out.find("tokenizer.json"), std::string::npos) << a.out;
  auto b = test::run(cmd + d.file("b"));
  ASSERT_EQ(b.exit_code, 0) << b.out;
  for (const char* f : {"sft_train.jsonl", "sft_eval.jsonl", "preference_train.jsonl", "preference_eval.jsonl",
                        "rl_train.jsonl", "rl_eval.jsonl", "manifest.json", "tokenizer.json", "tokenizer_config.json"}) {
    ASSERT_TRUE(path_exists(d.file(std::string("a/") + f))) << f;
    EXPECT_EQ(read_file(d.file(std::string("a/") + f)), read_file(d.file(std::string("b/") + f))) << f;
  }
}

TEST(MakeDataCli, HelpAndUsageErrors) {
  auto help = test::run(test::ptk_binary() + " make-data --help");
  EXPECT_EQ(help.exit_code, 0) << help.out;
  EXPECT_NE(help.out.find("--digits"), std::string::npos) << help.out;
  EXPECT_NE(help.out.find("Default difficulty"), std::string::npos) << help.out;
  auto no_task = test::run(test::ptk_binary() + " make-data --out /tmp/x");
  EXPECT_EQ(no_task.exit_code, 2) << no_task.out;
  EXPECT_NE(no_task.out.find("arithmetic"), std::string::npos) << no_task.out;
  auto bad_tok = test::run(test::ptk_binary() + " make-data arithmetic --out /tmp/x --tokenizer qwen");
  EXPECT_EQ(bad_tok.exit_code, 2) << bad_tok.out;
  test::TempDir d;
  auto too_many = test::run(test::ptk_binary() + " make-data arithmetic --digits 1 --train 1000 --out " + d.path());
  EXPECT_EQ(too_many.exit_code, 1) << too_many.out;
  EXPECT_NE(too_many.out.find("only 100 distinct problems"), std::string::npos) << too_many.out;
}

}  // namespace
}  // namespace ptk
