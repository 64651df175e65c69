// `ptk inspect-data` and `ptk prepare --show` through the binary, with the byte-level tokenizer (one
// token a byte, so the marked text is predictable): the trained spans of each format (sft prompt/
// completion, text, chat, packed rows with their documents; preference pairs; rl prompts), the
// token counts and file:line, --tokens and --color, from a recipe (nothing written in the run
// folder), usage errors; and prepare's truncation warning with --quiet.
#include <gtest/gtest.h>

#include "core/util/fs.h"
#include "datasets/byte_tokenizer.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

std::string has(const std::string& out, const std::string& want) {
  return out.find(want) == std::string::npos ? "missing: " + want + "\n--- in ---\n" + out : "";
}

struct Data {
  test::TempDir d;
  std::string tok, sft;
  Data() {
    tasks::write_byte_tokenizer(d.file("tok"));
    tok = d.file("tok");
    sft = d.write("sft.jsonl",
                  "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"yo\"}]}\n"
                  "{\"prompt\":\"ab\",\"completion\":\"cd\"}\n"
                  "{\"text\":\"xyz\"}\n");
  }
  std::string prepare(const std::string& input, const std::string& out, const std::string& extra = "") const {
    auto r = test::run(test::ptk_binary() + " prepare --quiet --tokenizer " + tok + " --input " + input + " --output " +
                       d.file(out) + " --max-seq-len 64 " + extra);
    EXPECT_EQ(r.exit_code, 0) << r.out;
    return d.file(out);
  }
  test::RunResult inspect(const std::string& args) const {
    return test::run(test::ptk_binary() + " inspect-data " + args + " 2>&1");
  }
};

TEST(InspectDataCli, SftRowsShowTheTrainedTextBetweenMarks) {
  Data x;
  std::string dir = x.prepare(x.sft, "unpacked", "--no-packing");
  auto r = x.inspect("--data " + dir + " --color never");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(has(r.out, dir + ": sft, 3 rows (3 documents), max_seq_len 64; rows 0..2 shown, trained tokens (loss mask 1) "
                         "between [[ and ]]"), "");
  // Chat: the assistant's reply and its <|im_end|>; not the template's "\n" after it.
  EXPECT_EQ(has(r.out, "=== row 0: 1 document, 25 of 64 tokens, 3 trained ===\n--- document 0 (" + x.sft +
                           ":1): 25 tokens, 3 trained ---\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
                           "[[yo<|im_end|>]]\n\n"),
            "");
  // Prompt/completion: the completion and the EOS; the prompt's length is shown.
  EXPECT_EQ(has(r.out, "--- document 1 (" + x.sft + ":2): 5 tokens, 3 trained; prompt 2 tokens ---\nab[[cd<|im_end|>]]\n"), "");
  // Text: every token but the first (nothing predicts it).
  EXPECT_EQ(has(r.out, "--- document 2 (" + x.sft + ":3): 4 tokens, 3 trained ---\nx[[yz<|im_end|>]]\n"), "");
  // --tokens: a | between tokens; --start/--rows pick the rows.
  auto t = x.inspect("--data " + dir + " --color never --tokens --start 1 --rows 1");
  ASSERT_EQ(t.exit_code, 0) << t.out;
  EXPECT_EQ(has(t.out, "\na|b|[[c|d|<|im_end|>]]\n"), "");
  EXPECT_EQ(t.out.find("=== row 0"), std::string::npos) << t.out;
  EXPECT_EQ(t.out.find("=== row 2"), std::string::npos) << t.out;
  // --color always: ANSI green instead of the brackets.
  auto c = x.inspect("--data " + dir + " --color always --start 1 --rows 1");
  EXPECT_EQ(has(c.out, "ab\x1b[1;32mcd<|im_end|>\x1b[0m\n"), "");
  EXPECT_EQ(c.out.find("[["), std::string::npos) << c.out;
}

TEST(InspectDataCli, PackedRowsShowEachDocument) {
  Data x;
  std::string dir = x.prepare(x.sft, "packed");
  auto r = x.inspect("--data " + dir + " --color never");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(has(r.out, ": sft, 1 packed row (3 documents)"), "");
  EXPECT_EQ(has(r.out, "=== row 0: 3 documents, 34 of 64 tokens, 9 trained ==="), "");
  // In placement order (best-fit decreasing: the longest first).
  size_t a = r.out.find("--- document 0 (" + x.sft + ":1)"), b = r.out.find("--- document 1 (" + x.sft + ":2)"),
         c = r.out.find("--- document 2 (" + x.sft + ":3)");
  ASSERT_NE(a, std::string::npos) << r.out;
  ASSERT_NE(b, std::string::npos) << r.out;
  ASSERT_NE(c, std::string::npos) << r.out;
  EXPECT_LT(a, b);
  EXPECT_LT(b, c);
  EXPECT_EQ(has(r.out, "\nab[[cd<|im_end|>]]\n"), "");
}

TEST(InspectDataCli, PreferenceAndRl) {
  Data x;
  std::string pairs = x.d.write("p.jsonl", "{\"prompt\":\"2+2=\",\"chosen\":\"4\",\"rejected\":\"5!\"}\n");
  auto p = x.inspect("--data " + x.prepare(pairs, "pairs", "--format preference") + " --color never");
  ASSERT_EQ(p.exit_code, 0) << p.out;
  EXPECT_EQ(has(p.out, "=== pair 0 (" + pairs + ":1): prompt 4 tokens, chosen 2, rejected 3 ===\n--- prompt (0 trained) ---\n"
                       "2+2=\n--- chosen (2 trained) ---\n[[4<|im_end|>]]\n--- rejected (3 trained) ---\n[[5!<|im_end|>]]\n"),
            "");
  std::string rl = x.d.write("rl.jsonl", "{\"prompt\":\"1+1=\",\"answer\":\"2\"}\n");
  auto q = x.inspect("--data " + x.prepare(rl, "rl", "--format rl") + " --color never");
  ASSERT_EQ(q.exit_code, 0) << q.out;
  EXPECT_EQ(has(q.out, "prompts are never trained (GRPO trains the completions it samples)"), "");
  EXPECT_EQ(has(q.out, "=== prompt 0 (" + rl + ":1): 4 tokens ===\n1+1=\n--- record ---\n{"), "");
  EXPECT_EQ(has(q.out, "\"answer\":\"2\""), "");
}

TEST(InspectDataCli, PrepareShow) {
  Data x;
  auto r = test::run(test::ptk_binary() + " prepare --quiet --tokenizer " + x.tok + " --input " + x.sft + " --output " +
                     x.d.file("o") + " --no-packing --show 2 2>&1");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(has(r.out, "3 records read"), "");
  EXPECT_EQ(has(r.out, "rows 0..1 shown"), "");
  EXPECT_EQ(has(r.out, "ab[[cd<|im_end|>]]"), "");
  EXPECT_EQ(r.out.find("=== row 2"), std::string::npos) << r.out;
  EXPECT_EQ(has(r.out, "(1 more after these: --start 2 shows them)"), "");
}

// The truncation warning reaches the terminal also with --quiet (which only silences progress).
TEST(InspectDataCli, PrepareWarnsAboutTruncationEvenWhenQuiet) {
  Data x;
  std::string in = x.d.write("long.jsonl", "{\"text\":\"" + std::string(100, 'a') + "\"}\n{\"text\":\"b\"}\n");
  auto r = test::run(test::ptk_binary() + " prepare --quiet --tokenizer " + x.tok + " --input " + in + " --output " +
                     x.d.file("o") + " --max-seq-len 64 2>&1");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(has(r.out, "prepare: WARNING: 1 of 2 records (50.0%) have more than data.max_seq_len = 64 tokens and were "
                       "truncated to 64: the rest of each is not trained; e.g. " + in + ":1\n---> HINT: raise data.max_seq_len"),
            "");
}

// From a stage recipe: the data prepared as the stage would (rm: pairs over max_seq_len dropped, with
// prepare's warning), in a temporary folder: nothing is written in the run folder.
TEST(InspectDataCli, FromARecipeWritesNothingInTheRunFolder) {
  Data x;
  std::string pairs = x.d.write("p.jsonl", "{\"prompt\":\"2+2=\",\"chosen\":\"4\",\"rejected\":\"5\"}\n"
                                           "{\"prompt\":\"" + std::string(40, 'q') + "\",\"chosen\":\"4\",\"rejected\":\"5\"}\n");
  std::string recipe = x.d.write("rm.json", "{\"run\": {\"dir\": \"" + x.d.file("run") + "\"}, \"tokenizer\": {\"path\": \"" +
                                                x.tok + "\"}, \"data\": {\"train\": [\"" + pairs +
                                                "\"], \"max_seq_len\": 32}, \"rm\": {\"center_rewards_coefficient\": 0.01}}\n");
  auto r = x.inspect("--recipe " + recipe + " --color never");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(has(r.out, "preparing train data into"), "");
  EXPECT_EQ(has(r.out, "prepare: WARNING: 1 of 2 pairs (50.0%) have a prompt + reply over data.max_seq_len = 32 tokens "
                       "and were dropped"), "");
  EXPECT_EQ(has(r.out, "e.g. " + pairs + ":2\n---> HINT: raise data.max_seq_len"), "");
  EXPECT_EQ(has(r.out, ": preference, 1 pair (1 document)"), "");
  EXPECT_EQ(has(r.out, "[[4<|im_end|>]]"), "");
  EXPECT_FALSE(path_exists(x.d.file("run")));
  // A key override reaches the preparation: a longer limit keeps both pairs.
  auto longer = x.inspect("--recipe " + recipe + " --color never data.max_seq_len=128");
  ASSERT_EQ(longer.exit_code, 0) << longer.out;
  EXPECT_EQ(has(longer.out, ": preference, 2 pairs"), "");
}

TEST(InspectDataCli, HelpAndUsageErrors) {
  Data x;
  auto help = x.inspect("--help");
  EXPECT_EQ(help.exit_code, 0) << help.out;
  for (const char* s : {"--data", "--recipe", "--rows", "--start", "--tokens", "--color", "--split", "[[ and ]]"})
    EXPECT_EQ(has(help.out, s), "");
  auto none = x.inspect("");
  EXPECT_EQ(none.exit_code, 2) << none.out;
  EXPECT_EQ(has(none.out, "give either --data PREPARED_DIR or --recipe STAGE_RECIPE"), "");
  auto color = x.inspect("--data " + x.d.path() + " --color pink");
  EXPECT_EQ(color.exit_code, 2) << color.out;
  auto missing = x.inspect("--data " + x.d.file("nope"));
  EXPECT_EQ(missing.exit_code, 1) << missing.out;
  EXPECT_EQ(has(missing.out, "manifest.json"), "");
}

}  // namespace
}  // namespace ptk
