// The byte-level demo tokenizer: GPT-2's byte map, the JSON layout, and — with .venv's Python
// references (scripts/setup.sh) — that Hugging Face tokenizers and transformers' AutoTokenizer load
// it, encode every byte to its own id, special tokens to 256..258, and that the ChatML template
// renders as documented.
#include <gtest/gtest.h>

#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <set>
#include <string>
#include <vector>

#include "core/util/fs.h"
#include "core/util/json.h"
#include "datasets/byte_tokenizer.h"
#include "tests/support/test_util.h"

namespace ptk::tasks {
namespace {

TEST(ByteTokenizer, Gpt2ByteMap) {
  EXPECT_EQ(gpt2_byte_char('!'), "!");
  EXPECT_EQ(gpt2_byte_char('a'), "a");
  EXPECT_EQ(gpt2_byte_char(' '), "\xC4\xA0");   // Ġ U+0120
  EXPECT_EQ(gpt2_byte_char('\n'), "\xC4\x8A");  // Ċ U+010A
  EXPECT_EQ(gpt2_byte_char(0x00), "\xC4\x80");  // Ā U+0100
  EXPECT_EQ(gpt2_byte_char(0xAD), "\xC5\x83");  // Ń U+0143, the last non-printable
  EXPECT_EQ(gpt2_byte_char(0xE9), "\xC3\xA9");  // é stands for itself
  std::set<std::string> all;
  for (int b = 0; b < 256; ++b) all.insert(gpt2_byte_char(static_cast<unsigned char>(b)));
  EXPECT_EQ(all.size(), 256u);
}

TEST(ByteTokenizer, JsonLayout) {
  auto d = json::parse(byte_tokenizer_json(), "tokenizer.json");
  const auto& model = d["model"];
  EXPECT_STREQ(model["type"].GetString(), "BPE");
  EXPECT_EQ(model["vocab"].MemberCount(), 256u);
  EXPECT_EQ(model["merges"].Size(), 0u);
  EXPECT_EQ(model["vocab"]["\xC4\xA0"].GetInt(), ' ');
  EXPECT_STREQ(d["pre_tokenizer"]["type"].GetString(), "ByteLevel");
  EXPECT_FALSE(d["pre_tokenizer"]["add_prefix_space"].GetBool());
  EXPECT_STREQ(d["decoder"]["type"].GetString(), "ByteLevel");
  ASSERT_EQ(d["added_tokens"].Size(), 3u);
  EXPECT_EQ(d["added_tokens"][2]["id"].GetInt(), 258);
  EXPECT_STREQ(d["added_tokens"][2]["content"].GetString(), "<|im_end|>");
  EXPECT_TRUE(d["added_tokens"][2]["special"].GetBool());
  auto c = json::parse(byte_tokenizer_config_json(), "tokenizer_config.json");
  EXPECT_STREQ(c["eos_token"].GetString(), "<|im_end|>");
  EXPECT_STREQ(c["pad_token"].GetString(), "<|endoftext|>");
  EXPECT_TRUE(c["bos_token"].IsNull());
  EXPECT_NE(std::string(c["chat_template"].GetString()).find("<|im_start|>"), std::string::npos);
  EXPECT_EQ(kByteTokenizerVocabSize, 259);
}

// Ids our layout promises: one per UTF-8 byte; "<|...|>" specials as whole tokens.
std::vector<int> expected_ids(const std::string& text) {
  const std::pair<const char*, int> specials[] = {{"<|endoftext|>", 256}, {"<|im_start|>", 257}, {"<|im_end|>", 258}};
  std::vector<int> ids;
  for (size_t i = 0; i < text.size();) {
    bool matched = false;
    for (auto& [s, id] : specials) {
      if (text.compare(i, std::string(s).size(), s) == 0) {
        ids.push_back(id);
        i += std::string(s).size();
        matched = true;
        break;
      }
    }
    if (!matched) ids.push_back(static_cast<unsigned char>(text[i++]));
  }
  return ids;
}

std::vector<int> ints(const rapidjson::Value& a) {
  std::vector<int> v;
  for (const auto& x : a.GetArray()) v.push_back(x.GetInt());
  return v;
}

TEST(ByteTokenizer, HuggingFaceTokenizersAgree) {
  std::string py = test::reference_python();
  if (py.empty()) PTK_SKIP_WITHOUT("venv") << "no .venv/bin/python3 with HF tokenizers and transformers (scripts/setup.sh makes it)";
  test::TempDir dir;
  write_byte_tokenizer(dir.path());

  const std::vector<std::string> texts = {
      "What is 7 * 8?",
      "The answer is 56.",
      "  two  spaces\tand a tab\nnewline ",
      std::string("ctrl \x00\x01\x1f\x7f bytes", 17),
      "h\xC3\xA9llo \xE2\x9C\x93 \xE6\x97\xA5\xE6\x9C\xAC",  // héllo ✓ 日本
      "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n",
      "x<|endoftext|>y<|im_end|>",
  };
  rapidjson::StringBuffer buf;
  rapidjson::Writer<rapidjson::StringBuffer> w(buf);
  w.StartObject();
  w.Key("texts");
  w.StartArray();
  for (const auto& t : texts) w.String(t.data(), static_cast<rapidjson::SizeType>(t.size()));
  w.EndArray();
  w.Key("messages");
  w.StartArray();
  for (auto [role, content] : {std::pair{"user", "What is 3 + 4?"}, std::pair{"assistant", "The answer is 7."},
                               std::pair{"user", "What is 2 * 5?"}}) {
    w.StartObject();
    w.Key("role");
    w.String(role);
    w.Key("content");
    w.String(content);
    w.EndObject();
  }
  w.EndArray();
  w.EndObject();
  std::string input = dir.write("input.json", std::string(buf.GetString(), buf.GetSize()));

  test::TempDir out;
  auto r = test::run(py + " " + test::source_dir() + "/tests/tasks/hf_tokenizer_check.py " + dir.path() + " " + input +
                     " " + out.file("ref.json"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  auto d = json::parse(read_file(out.file("ref.json")), "hf_tokenizer_check.py output");
  EXPECT_EQ(d["vocab_size"].GetInt(), kByteTokenizerVocabSize);
  EXPECT_EQ(d["eos_id"].GetInt(), 258);
  EXPECT_EQ(d["pad_id"].GetInt(), 256);
  ASSERT_EQ(d["ids"].Size(), texts.size());
  for (size_t i = 0; i < texts.size(); ++i) {
    EXPECT_EQ(ints(d["ids"][i]), expected_ids(texts[i])) << "text " << i;
    const auto& dec = d["decoded"][i];
    EXPECT_EQ(std::string(dec.GetString(), dec.GetStringLength()), texts[i]) << "decode of text " << i;
  }
  const std::string chat =
      "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\nThe answer is 7.<|im_end|>\n"
      "<|im_start|>user\nWhat is 2 * 5?<|im_end|>\n<|im_start|>assistant\n";
  EXPECT_EQ(d["chat"].GetString(), chat);
  EXPECT_EQ(ints(d["chat_ids"]), expected_ids(chat));
}

}  // namespace
}  // namespace ptk::tasks
