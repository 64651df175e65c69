// `ptk prepare` through the binary: --input/--output, reuse on a rerun, a recipe with data.train
// and data.eval, on_error via override, and usage errors.
#include <gtest/gtest.h>

#include "core/util/fs.h"
#include "datasets/byte_tokenizer.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

TEST(PrepareCli, InputOutputAndReuse) {
  test::TempDir d;
  tasks::write_byte_tokenizer(d.file("tok"));
  d.write("a.jsonl", "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"yo\"}]}\n");
  d.write("b.jsonl", "{\"text\":\"plain\"}\n");
  std::string cmd = test::ptk_binary() + " prepare --tokenizer " + d.file("tok") + " --input '" + d.path() +
                    "/*.jsonl' --input " + d.file("b.jsonl") + ":2 --output " + d.file("out") + " --max-seq-len 64 --quiet";
  auto a = test::run(cmd);
  ASSERT_EQ(a.exit_code, 0) << a.out;
  EXPECT_NE(a.out.find("3 records read, 0 skipped, 0 truncated"), std::string::npos) << a.out;
  EXPECT_NE(a.out.find("4 docs in 1 rows"), std::string::npos) << a.out;  // b.jsonl twice (weight 2) + once by the glob
  EXPECT_NE(a.out.find("MiB/s"), std::string::npos) << a.out;
  EXPECT_TRUE(path_exists(d.file("out/manifest.json")));
  auto b = test::run(cmd);
  ASSERT_EQ(b.exit_code, 0) << b.out;
  EXPECT_NE(b.out.find("up to date, reused"), std::string::npos) << b.out;
}

TEST(PrepareCli, RecipeTrainAndEvalWithOverrides) {
  test::TempDir d;
  tasks::write_byte_tokenizer(d.file("tok"));
  d.write("train.jsonl", "{\"prompt\":\"p\",\"completion\":\"c\"}\n{\"prompt\":\"p\"}\n");
  d.write("eval.jsonl", "{\"prompt\":\"q\",\"completion\":\"d\"}\n");
  std::string recipe = d.write("r.json", "{\n  // a comment\n  \"run\": {\"dir\": \"" + d.file("run") +
                                             "\"},\n  \"tokenizer\": {\"path\": \"" + d.file("tok") +
                                             "\", \"chat_template\": \"chatml\"},\n  \"data\": {\"train\": [\"" +
                                             d.file("train.jsonl") + "\"], \"eval\": [\"" + d.file("eval.jsonl") +
                                             "\"], \"max_seq_len\": 32}\n}\n");
  auto fail = test::run(test::ptk_binary() + " prepare --quiet --recipe " + recipe);
  EXPECT_EQ(fail.exit_code, 1) << fail.out;
  EXPECT_NE(fail.out.find(d.file("train.jsonl") + ":2: missing field \"completion\""), std::string::npos) << fail.out;
  auto ok = test::run(test::ptk_binary() + " prepare --recipe " + recipe + " data.on_error=skip");
  ASSERT_EQ(ok.exit_code, 0) << ok.out;
  EXPECT_NE(ok.out.find("skipped 1 bad record:\n  " + d.file("train.jsonl") + ":2: missing field \"completion\""), std::string::npos)
      << ok.out;
  EXPECT_TRUE(path_exists(d.file("run/data/train/manifest.json")));
  EXPECT_TRUE(path_exists(d.file("run/data/eval/manifest.json")));
  EXPECT_EQ(read_file(d.file("run/data/train/skipped.txt")), d.file("train.jsonl") + ":2: missing field \"completion\"\n");
}

// The hostile-input repro through the real binary: a training line and a recipe nested 1M levels
// deep end in exit 1 naming file:line (they were exit 139, a stack overflow, naming nothing), the
// deep line is skipped and listed under data.on_error=skip, and a FIFO as data file is refused
// (not waited on) by name.
TEST(PrepareCli, DeepJsonAndFifosAreErrorsNotCrashesOrHangs) {
  test::TempDir d;
  tasks::write_byte_tokenizer(d.file("tok"));
  d.write("train.jsonl", "{\"text\":\"a\"}\n" + std::string(1000000, '[') + "\n{\"text\":\"b\"}\n");
  const std::string bad = d.file("train.jsonl") + ":2: invalid JSON at column 513: nested deeper than 512 levels";
  std::string base = test::ptk_binary() + " prepare --tokenizer " + d.file("tok") + " --max-seq-len 64 --input " +
                     d.file("train.jsonl");
  auto fail = test::run(base + " --output " + d.file("fail"));
  EXPECT_EQ(fail.exit_code, 1) << fail.out;
  EXPECT_NE(fail.out.find(bad), std::string::npos) << fail.out;
  auto skip = test::run(base + " --output " + d.file("skip") + " data.on_error=skip");
  ASSERT_EQ(skip.exit_code, 0) << skip.out;
  EXPECT_NE(skip.out.find("skipped 1 bad record:\n  " + bad), std::string::npos) << skip.out;
  EXPECT_EQ(read_file(d.file("skip/skipped.txt")), bad + "\n");

  std::string recipe = d.write("r.json", "{\"data\": " + std::string(1000000, '['));
  auto deep_recipe = test::run(test::ptk_binary() + " prepare --quiet --recipe " + recipe);
  EXPECT_EQ(deep_recipe.exit_code, 1) << deep_recipe.out;
  EXPECT_NE(deep_recipe.out.find(recipe + ":1:521: invalid JSON: nested deeper than 512 levels"), std::string::npos)
      << deep_recipe.out;

  // `timeout` bounds the run should the check regress (then 124, not a hung test).
  std::string fifo = test::make_fifo(d.file("fifo.jsonl"));
  auto f = test::run("timeout 60 " + test::ptk_binary() + " prepare --quiet --tokenizer " + d.file("tok") +
                     " --input " + fifo + " --output " + d.file("f"));
  EXPECT_EQ(f.exit_code, 1) << f.out;
  EXPECT_NE(f.out.find("cannot open " + fifo + ": is a FIFO, not a regular file"), std::string::npos) << f.out;
}

TEST(PrepareCli, HelpAndUsageErrors) {
  auto help = test::run(test::ptk_binary() + " prepare --help");
  EXPECT_EQ(help.exit_code, 0) << help.out;
  for (const char* s : {"--input", "--format", "--max-seq-len", "data.on_error", "data.packing", "--overlong"})
    EXPECT_NE(help.out.find(s), std::string::npos) << s;
  auto none = test::run(test::ptk_binary() + " prepare");
  EXPECT_EQ(none.exit_code, 2) << none.out;
  EXPECT_NE(none.out.find("no data"), std::string::npos) << none.out;
  auto no_out = test::run(test::ptk_binary() + " prepare --input x.jsonl");
  EXPECT_EQ(no_out.exit_code, 2) << no_out.out;
  test::TempDir d;
  auto missing = test::run(test::ptk_binary() + " prepare --tokenizer " + d.path() + " --input " + d.file("nope.jsonl") +
                           " --output " + d.file("o"));
  EXPECT_EQ(missing.exit_code, 1) << missing.out;
  EXPECT_NE(missing.out.find("matches no file"), std::string::npos) << missing.out;
  auto fmt = test::run(test::ptk_binary() + " prepare --format dpo --input a --output b");
  EXPECT_EQ(fmt.exit_code, 1) << fmt.out;
  EXPECT_NE(fmt.out.find("choose sft | preference | rl"), std::string::npos) << fmt.out;
}

}  // namespace
}  // namespace ptk
