// `ptk tokenize` end to end: JSONL text and chat lines in, ids out in order, errors with file:line.
// Not the tokenizer's own correctness (tokenizer_test, qwen_golden_test).
#include <gtest/gtest.h>

#include "core/tokenizer/tokenizer.h"
#include "tests/tokenizer/golden.h"

namespace ptk::tokenizer {
namespace {

using ptk::test::run;
using ptk::test::TempDir;
using test::data_dir;

TEST(TokenizeCli, TextAndChatLines) {
  ASSERT_TRUE(path_exists(ptk::test::ptk_binary())) << "ptk binary not built: " << ptk::test::ptk_binary();
  TempDir d;
  std::string tok = data_dir() + "/bytelevel_chatml.json";
  std::string in = d.write("in.jsonl", "{\"text\": \"ab\"}\n{\"text\": \"<|im_end|>\"}\n\n{\"text\": \"\"}\n");
  auto r = run(ptk::test::ptk_binary() + " tokenize --tokenizer " + tok + " --input " + in + " --output " + d.file("out.jsonl"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(read_file(d.file("out.jsonl")), "{\"ids\":[97,98]}\n{\"ids\":[258]}\n{\"ids\":[]}\n");

  std::string chat = d.write("chat.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"1\"}, {\"role\": \"assistant\", \"content\": \"2\"}]}\n");
  r = run(ptk::test::ptk_binary() + " tokenize --chat --chat-template chatml --with-mask --tokenizer " + tok + " --input " + chat +
          " --output " + d.file("chat_out.jsonl"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  Tokenizer t = Tokenizer::load(tok, {ChatTemplate::kChatML});
  auto e = t.render_chat({{"user", "1"}, {"assistant", "2"}});
  std::string ids, mask;
  for (size_t i = 0; i < e.ids.size(); ++i) {
    ids += (i ? "," : "") + std::to_string(e.ids[i]);
    mask += (i ? "," : "") + std::to_string(e.assistant_mask[i]);
  }
  EXPECT_EQ(read_file(d.file("chat_out.jsonl")), "{\"ids\":[" + ids + "],\"assistant_mask\":[" + mask + "]}\n");

  // Errors name the file and line; auto without a chat_template names the override.
  std::string bad = d.write("bad.jsonl", "{\"text\": \"ok\"}\n{\"txt\": 1}\n");
  r = run(ptk::test::ptk_binary() + " tokenize --tokenizer " + tok + " --input " + bad + " --output " + d.file("x.jsonl"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.out.find("bad.jsonl:2"), std::string::npos) << r.out;
  r = run(ptk::test::ptk_binary() + " tokenize --chat --tokenizer " + tok + " --input " + chat + " --output " + d.file("y.jsonl"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.out.find("tokenizer.chat_template"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace ptk::tokenizer
