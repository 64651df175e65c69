// Tokenizer behaviour on small hand-made tokenizer.json files (golden ids from HF tokenizers via
// make_golden.js), refusals, UTF-8 handling, batching and chat rendering. Qwen's own vocabulary is
// tested in qwen_golden_test.cpp.
#include <gtest/gtest.h>

#include <random>

#include "core/tokenizer/messages_json.h"
#include "core/tokenizer/prompt_completion.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/error.h"
#include "tests/tokenizer/golden.h"

namespace ptk::tokenizer {
namespace {

using test::data_dir;
using test::ids_of;
using test::str;

std::string load_error(const std::string& json_text) {
  try {
    Tokenizer::from_json(json_text, "", "bad.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::string replaced(std::string s, const std::string& from, const std::string& to) {
  size_t p = s.find(from);
  EXPECT_NE(p, std::string::npos) << from;
  if (p != std::string::npos) s.replace(p, from.size(), to);
  return s;
}

TEST(Tokenizer, TinyFilesMatchHuggingFace) {
  auto golden = test::read_jsonl(data_dir() + "/golden_tiny.jsonl");
  ASSERT_GE(golden.size(), 30u);
  for (const auto& g : golden) {
    Tokenizer t = Tokenizer::load(data_dir() + "/" + str(g["file"]));
    std::string text = str(g["text"]);
    SCOPED_TRACE(str(g["file"]) + ": " + text);
    EXPECT_EQ(t.encode(text), ids_of(g["ids"]));
    EXPECT_EQ(t.decode(ids_of(g["ids"])), str(g["decoded"]));
    EXPECT_EQ(t.decode(ids_of(g["ids"]), true), str(g["decoded_skip"]));
  }
}

TEST(Tokenizer, MergesInBothFormsAreTheSame) {
  Tokenizer a = Tokenizer::load(data_dir() + "/tiny_merges_pairs.json");
  Tokenizer b = Tokenizer::load(data_dir() + "/tiny_merges_strings.json");
  for (const char* s : {"hello world", "abcabcab hellohello  world\n", "  \t x"}) EXPECT_EQ(a.encode(s), b.encode(s)) << s;
  EXPECT_EQ(a.encode("hello"), std::vector<TokenId>{a.token_to_id("hello")});
}

TEST(Tokenizer, IgnoreMergesTakesWholeWordsFromTheVocabulary) {
  Tokenizer t = Tokenizer::load(data_dir() + "/tiny_ignore_merges.json");
  EXPECT_EQ(t.encode("hello"), std::vector<TokenId>{t.token_to_id("hello")});
  // Same vocabulary without ignore_merges: "hello" cannot be reached through the two merges.
  std::string json = replaced(read_file(data_dir() + "/tiny_ignore_merges.json"), "\"ignore_merges\": true",
                              "\"ignore_merges\": false");
  Tokenizer u = Tokenizer::from_json(json);
  EXPECT_EQ(u.encode("hello").size(), 3u);  // h e -> he, l l -> ll: [he, ll, o]
}

TEST(Tokenizer, MakeDataByteLevelTokenizer) {
  // What `ptk make-data` writes: 256 byte tokens, ChatML specials, empty merges.
  Tokenizer t = Tokenizer::load(data_dir() + "/bytelevel_chatml.json");
  EXPECT_EQ(t.vocab_size(), 259u);
  EXPECT_EQ(t.token_to_id("<|endoftext|>"), 256);
  EXPECT_EQ(t.im_start_id(), 257);
  EXPECT_EQ(t.im_end_id(), 258);
  EXPECT_EQ(t.eos_id(), 256);  // no tokenizer_config.json: <|endoftext|>
  EXPECT_EQ(t.pad_id(), 256);
  EXPECT_TRUE(t.is_special(258));
  std::string text = "12+30=42\n";
  auto ids = t.encode(text);
  ASSERT_EQ(ids.size(), text.size());
  for (size_t i = 0; i < text.size(); ++i) EXPECT_EQ(ids[i], static_cast<unsigned char>(text[i]));
  EXPECT_EQ(t.decode(ids), text);
  // No chat_template to recognise: auto refuses and names the override; chatml works.
  try {
    t.chat_template();
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer.chat_template"), std::string::npos) << e.what();
  }
  Tokenizer c = Tokenizer::load(data_dir() + "/bytelevel_chatml.json", {ChatTemplate::kChatML});
  ChatEncoding enc = c.render_chat({{"user", "1+2="}, {"assistant", "3"}});
  EXPECT_EQ(enc.text, "<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n");
  ASSERT_EQ(enc.ids.size(), enc.assistant_mask.size());
  std::vector<TokenId> masked;
  for (size_t i = 0; i < enc.ids.size(); ++i)
    if (enc.assistant_mask[i]) masked.push_back(enc.ids[i]);
  EXPECT_EQ(masked, (std::vector<TokenId>{'3', 258}));
}

TEST(Tokenizer, RefusesWhatItDoesNotSupport) {
  std::string wp = load_error(read_file(data_dir() + "/unsupported_wordpiece.json"));
  EXPECT_NE(wp.find("supported"), std::string::npos) << wp;
  EXPECT_NE(wp.find("HINT"), std::string::npos) << wp;
  std::string base = read_file(data_dir() + "/tiny_merges_strings.json");
  struct Case {
    std::string from, to, expect;
  };
  for (const Case& c : std::vector<Case>{
           {"\"type\": \"BPE\"", "\"type\": \"Unigram\"", "model.type"},
           {"\"h e\"", "\"h e x\"", "model.merges[0]"},
           {"\"h e\"", "\"h zz\"", "model.merges[0]"},
           {"\"behavior\": \"Isolated\"", "\"behavior\": \"Removed\"", "behavior"},
           {"\"truncation\": null", "\"truncation\": {\"max_length\": 5}", "truncation"},
           {"\"version\": \"1.0\"", "\"version\": \"1.0\", \"extra\": 1", "extra"},
           {"\"type\": \"NFC\"", "\"type\": \"NFKC\"", "normalizer"},
           {"\"dropout\": null", "\"dropout\": 0.1", "dropout"},
           {"\"ab\": 265", "\"ab\": 777777257", "far beyond"},  // fuzz_tokenizer_load found the OOM
           {"\"add_prefix_space\": false", "\"add_prefix_space\": true", "add_prefix_space"},
       }) {
    std::string err = load_error(replaced(base, c.from, c.to));
    EXPECT_NE(err.find(c.expect), std::string::npos) << c.to << " -> " << err;
    EXPECT_NE(err.find("bad.json"), std::string::npos) << err;
  }
  EXPECT_NE(load_error("{not json").find("bad.json:1"), std::string::npos);
}

// tokenizer.json and tokenizer_config.json nested 1M levels deep are refused at the bracket past
// json::kMaxDepth (they used to overflow the stack); a FIFO in their place is refused before open();
// a folder without tokenizer.json is named as such (it used to be read as an empty text).
TEST(Tokenizer, DeepJsonFifosAndFoldersAreRefusedByName) {
  const std::string deep(1000000, '[');
  EXPECT_EQ(load_error("{\"version\": " + deep), "bad.json:1:524: invalid JSON: nested deeper than 512 levels");
  const std::string good = read_file(data_dir() + "/tiny_merges_strings.json");
  try {
    Tokenizer::from_json(good, "{\"chat_template\": " + deep, "tok/tokenizer.json");
    ADD_FAILURE() << "a 1M-level tokenizer_config.json loaded";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()),
              "tok/tokenizer.json (tokenizer_config.json):1:530: invalid JSON: nested deeper than 512 levels");
  }

  ptk::test::TempDir d;
  std::string fifo = ptk::test::make_fifo(d.file("tokenizer.json"));
  EXPECT_EQ(ptk::test::error_within([&] { Tokenizer::load(d.path()); }, fifo),
            "cannot open " + fifo + ": is a FIFO, not a regular file");
  ptk::test::TempDir d2;
  d2.write("tokenizer.json", good);
  std::string cfg_fifo = ptk::test::make_fifo(d2.file("tokenizer_config.json"));
  EXPECT_EQ(ptk::test::error_within([&] { Tokenizer::load(d2.path()); }, cfg_fifo),
            "cannot open " + cfg_fifo + ": is a FIFO, not a regular file");
  ptk::test::TempDir empty;
  try {
    Tokenizer::load(empty.path());
    ADD_FAILURE() << "a folder without tokenizer.json loaded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(empty.path() + " is neither a tokenizer.json nor a folder holding one"),
              std::string::npos)
        << e.what();
  }
}

TEST(Tokenizer, Utf8RepairIsPerMaximalSubpart) {
  EXPECT_TRUE(is_valid_utf8("héllo 你好 😀"));
  EXPECT_FALSE(is_valid_utf8("\xC0\xAF"));
  EXPECT_FALSE(is_valid_utf8("\xED\xA0\x80"));  // surrogate
  EXPECT_EQ(to_valid_utf8("a\x80z"), "a\uFFFDz");
  EXPECT_EQ(to_valid_utf8("\xF0\x9F\x98"), "\uFFFD");          // truncated 4-byte: one subpart
  EXPECT_EQ(to_valid_utf8("\xE0\x80\xAF"), "\uFFFD\uFFFD\uFFFD");  // overlong: each byte
  EXPECT_EQ(to_valid_utf8("\xF4\x90\x80\x80"), "\uFFFD\uFFFD\uFFFD\uFFFD");
  EXPECT_EQ(nfc("e\u0301"), "\u00e9");
}

TEST(Tokenizer, InvalidUtf8EncodesAsItsRepairAndNeverCrashes) {
  Tokenizer t = Tokenizer::load(data_dir() + "/tiny_added.json");
  std::mt19937 rng(7);
  for (int i = 0; i < 3000; ++i) {
    std::string s(rng() % 40, '\0');
    for (auto& c : s) c = static_cast<char>(rng() % 4 == 0 ? "<|end>[SW]\xcc\x81 "[rng() % 14] : rng() % 256);
    auto ids = t.encode(s);
    EXPECT_EQ(ids, t.encode(to_valid_utf8(s)));
    std::string back = t.decode(ids);
    EXPECT_TRUE(is_valid_utf8(back));
  }
}

TEST(Tokenizer, BatchEqualsOneByOne) {
  Tokenizer t = Tokenizer::load(data_dir() + "/tiny_added.json");
  std::vector<std::string> texts;
  std::mt19937 rng(3);
  const char* words[] = {"hello", " world", "<mask>", "abc", "e\u0301!", "\n", "  ", "[SW]", "你好", "'s"};
  for (int i = 0; i < 3000; ++i) {
    std::string s;
    for (int k = 0; k < 40; ++k) s += words[rng() % 10];
    texts.push_back(s);
  }
  auto batch = t.encode_batch(texts, 2);
  ASSERT_EQ(batch.size(), texts.size());
  for (size_t i = 0; i < texts.size(); i += 97) EXPECT_EQ(batch[i], t.encode(texts[i])) << i;
  EXPECT_EQ(t.encode_batch({}, 4).size(), 0u);
}

TEST(Tokenizer, ChatRefusals) {
  Tokenizer t = Tokenizer::load(data_dir() + "/bytelevel_chatml.json", {ChatTemplate::kQwen25});
  auto err = [&](const std::vector<Message>& m) {
    try {
      t.render_chat(m);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(err({}).find("at least one message"), std::string::npos);
  EXPECT_NE(err({{"narrator", "x"}}).find("narrator"), std::string::npos);
  EXPECT_THROW(parse_chat_template("llama3"), Error);
  EXPECT_EQ(parse_chat_template("qwen2.5"), ChatTemplate::kQwen25);
  // Tool messages and tool calls render (chat_template_test.cpp checks how).
  EXPECT_NE(t.render_chat_text({{"user", "x"}, {"tool", "42"}}).find("<tool_response>\n42\n</tool_response>"),
            std::string::npos);
  rapidjson::Document d = json::parse(R"([{"role": "user", "content": null, "tool_calls": [{"x": 1}]}])", "t");
  try {
    parse_messages(d, "f.jsonl:3: messages");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("f.jsonl:3: messages[0].tool_calls on a user message"), std::string::npos)
        << e.what();
  }
  rapidjson::Document ok = json::parse(R"([{"role": "user", "content": "hi"}])", "t");
  auto msgs = parse_messages(ok, "x");
  ASSERT_EQ(msgs.size(), 1u);
  EXPECT_EQ(msgs[0].content, "hi");
}

TEST(Tokenizer, PromptCompletionMask) {
  Tokenizer t = Tokenizer::load(data_dir() + "/tiny_merges_pairs.json");
  // "hello" + " world": the completion starts at a token boundary.
  auto r = t.encode_prompt_completion("hello", " world", false);
  EXPECT_EQ(r.ids, t.encode("hello world"));
  EXPECT_EQ(r.prompt_tokens, 1u);
  EXPECT_EQ(r.completion_mask, (std::vector<uint8_t>{0, 1}));
  // make-data's tokenizer: every byte its own token; EOS appended and masked in.
  Tokenizer b = Tokenizer::load(data_dir() + "/bytelevel_chatml.json");
  auto s = b.encode_prompt_completion("1+2=", "3", true);
  EXPECT_EQ(s.ids, (std::vector<TokenId>{'1', '+', '2', '=', '3', 256}));
  EXPECT_EQ(s.completion_mask, (std::vector<uint8_t>{0, 0, 0, 0, 1, 1}));
  EXPECT_EQ(s.prompt_tokens, 4u);
  // A completion that already ends with the EOS token's text gets no second EOS (TRL's rule; the
  // reference suite's rm_reference_test found ptk adding one).
  auto e = b.encode_prompt_completion("1+2=", "3<|endoftext|>", true);
  EXPECT_EQ(e.ids, s.ids);
  EXPECT_EQ(e.completion_mask, s.completion_mask);
}

// Tokenized apart (what prepare does since kPrepareVersion 4): "hel" + "lo" is one token "hello" as
// one text, which started in the prompt, so the one-text mask left the completion with no trained
// token at all; apart it is 'he' 'l' | 'l' 'o', the completion's two tokens trained, and
// boundary_merged says the one text would have differed.
TEST(Tokenizer, PromptCompletionApartAtAMergingBoundary) {
  Tokenizer t = Tokenizer::load(data_dir() + "/tiny_merges_pairs.json");
  auto joint = t.encode_prompt_completion("hel", "lo", false);
  ASSERT_EQ(joint.ids, std::vector<TokenId>{t.token_to_id("hello")});
  EXPECT_EQ(joint.completion_mask, std::vector<uint8_t>{0});  // what prepare trained before: nothing
  bool merged = false;
  auto r = encode_prompt_completion_apart(t, "hel", "lo", false, SIZE_MAX, &merged);
  std::vector<TokenId> want = t.encode("hel"), c = t.encode("lo");
  want.insert(want.end(), c.begin(), c.end());
  EXPECT_EQ(r.ids, want);
  EXPECT_EQ(r.ids.size(), 4u);
  EXPECT_EQ(r.completion_mask, (std::vector<uint8_t>{0, 0, 1, 1}));
  EXPECT_EQ(r.prompt_tokens, 2u);
  EXPECT_EQ(t.decode({r.ids.begin() + 2, r.ids.end()}), "lo");
  EXPECT_TRUE(merged);
  // A boundary at a token boundary: the same ids as one text, no merge reported.
  auto same = encode_prompt_completion_apart(t, "hello", " world", false, SIZE_MAX, &merged);
  EXPECT_EQ(same.ids, t.encode("hello world"));
  EXPECT_EQ(same.completion_mask, (std::vector<uint8_t>{0, 1}));
  EXPECT_FALSE(merged);
  // max_ids keeps the first ids and mask values: inside the prompt, at the boundary, inside the completion.
  for (size_t n : {1, 2, 3, 4, 5}) {
    SCOPED_TRACE(n);
    auto cut = encode_prompt_completion_apart(t, "hel", "lo", false, n, &merged);
    const size_t k = std::min<size_t>(n, 4);
    EXPECT_EQ(cut.ids, std::vector<TokenId>(r.ids.begin(), r.ids.begin() + static_cast<std::ptrdiff_t>(k)));
    EXPECT_EQ(cut.completion_mask, std::vector<uint8_t>(r.completion_mask.begin(), r.completion_mask.begin() + static_cast<std::ptrdiff_t>(k)));
    EXPECT_EQ(cut.prompt_tokens, std::min<size_t>(n, 2));
    EXPECT_TRUE(merged);  // the one text differs already in its first id
  }
  // EOS appended (TRL's rule: not when the completion ends with its text), and cut by max_ids.
  Tokenizer b = Tokenizer::load(data_dir() + "/bytelevel_chatml.json");
  auto e = encode_prompt_completion_apart(b, "1+2=", "3", true);
  EXPECT_EQ(e.ids, (std::vector<TokenId>{'1', '+', '2', '=', '3', 256}));
  EXPECT_EQ(e.completion_mask, (std::vector<uint8_t>{0, 0, 0, 0, 1, 1}));
  EXPECT_EQ(encode_prompt_completion_apart(b, "1+2=", "3<|endoftext|>", true).ids, e.ids);
  EXPECT_EQ(encode_prompt_completion_apart(b, "1+2=", "3", true, 5).ids, (std::vector<TokenId>{'1', '+', '2', '=', '3'}));
}

// NFC changes a line (e + U+0301 -> é): token starts inside such a line were the line's start, so
// the completion's tokens on the prompt's last line counted as prompt (no loss; prepare's
// independent check against HF found it). The mask must be that of the same text already in NFC,
// whose starts are exact.
TEST(Tokenizer, PromptCompletionMaskWhereNfcChangesTheLine) {
  Tokenizer t = Tokenizer::load(data_dir() + "/tiny_merges_pairs.json");
  const std::pair<const char*, const char*> cases[] = {{"Cafe\u0301 hello", " world"},
                                                       {"x\ne\u0301\nhello", " world hello"},
                                                       {"hello", " worlde\u0301"},
                                                       {"Cafe\u0301\nhello", " world\ne\u0301 world"}};
  for (auto [p, c] : cases) {
    SCOPED_TRACE(std::string(p) + " | " + c);
    auto r = t.encode_prompt_completion(p, c, false);
    auto want = t.encode_prompt_completion(nfc(p), nfc(c), false);
    EXPECT_EQ(r.ids, want.ids);
    EXPECT_EQ(r.completion_mask, want.completion_mask);
    EXPECT_EQ(r.prompt_tokens, want.prompt_tokens);
    EXPECT_LT(want.prompt_tokens, want.ids.size());  // the completion has tokens
  }
}

}  // namespace
}  // namespace ptk::tokenizer
