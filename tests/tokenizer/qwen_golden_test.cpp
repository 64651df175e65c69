// Differential tests on Qwen's vocabulary: ids, decoding and chat rendering against golden files that
// make_golden.py produced with HF tokenizers and transformers' apply_chat_template (pinned in
// requirements.txt; the same bytes as the npm tokenizers 0.23.2 + @huggingface/jinja made before),
// plus a live rerun of that script with .venv's Python. Skips (with a message) when Qwen's
// tokenizer.json is absent.
#include <gtest/gtest.h>

#include <cstdlib>

#include "core/tokenizer/prompt_completion.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/error.h"
#include "tests/tokenizer/golden.h"
#include "tests/support/test_util.h"

namespace ptk::tokenizer {
namespace {

using test::data_dir;
using test::ids_of;
using test::str;

class Qwen : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = test::qwen_tokenizer_json();
    if (path_.empty())
      PTK_SKIP_WITHOUT("qwen-tokenizer") << "Qwen tokenizer.json not found (assets/tokenizers/qwen/ or ../shared/tokenizers/qwen): "
                      "run scripts/setup.sh with ../shared beside the checkout";
    json_ = read_file(path_);
    config_ = read_file(data_dir() + "/qwen2.5_tokenizer_config.json");
  }
  Tokenizer load(ChatTemplate ct = ChatTemplate::kAuto, const std::string& config = "\x01") const {
    return Tokenizer::from_json(json_, config == "\x01" ? config_ : config, path_, {ct});
  }
  std::string path_, json_, config_;
};

// Every corpus line: identical ids, identical decodes, and decode(encode(x)) == NFC(x).
void check_corpus(const Tokenizer& t, const std::string& dir) {
  auto corpus = test::read_jsonl(data_dir() + "/corpus.jsonl");
  auto golden = test::read_jsonl(dir + "/golden_qwen.jsonl");
  ASSERT_EQ(corpus.size(), golden.size());
  size_t same = 0;
  for (size_t i = 0; i < corpus.size(); ++i) {
    const auto& c = corpus[i];
    const auto& g = golden[i];
    std::string text = c.HasMember("hex") ? test::hex_decode(str(c["hex"])) : str(c["text"]);
    SCOPED_TRACE(str(c["name"]));
    auto ids = t.encode(text);
    EXPECT_EQ(ids, ids_of(g["ids"]));
    same += ids == ids_of(g["ids"]);
    EXPECT_EQ(t.decode(ids), str(g["decoded"]));
    EXPECT_EQ(t.decode(ids, true), str(g["decoded_skip"]));
    EXPECT_EQ(t.decode(ids), str(g["nfc"]));
    EXPECT_EQ(nfc(to_valid_utf8(text)), str(g["nfc"]));
  }
  std::printf("corpus: %zu/%zu texts with identical ids\n", same, corpus.size());
}

TEST_F(Qwen, CorpusIdsMatchHuggingFace) { check_corpus(load(), data_dir()); }

TEST_F(Qwen, DecodeCutCharactersAroundAddedTokens) {
  Tokenizer t = load();
  for (const auto& g : test::read_jsonl(data_dir() + "/golden_decode.jsonl")) {
    EXPECT_EQ(t.decode(ids_of(g["ids"])), str(g["decoded"]));
    EXPECT_EQ(t.decode(ids_of(g["ids"]), true), str(g["decoded_skip"]));
  }
  EXPECT_THROW(t.decode({static_cast<TokenId>(t.vocab_size())}), Error);
}

TEST_F(Qwen, SpecialIdsAndLookups) {
  Tokenizer t = load();
  EXPECT_EQ(t.im_start_id(), 151644);
  EXPECT_EQ(t.im_end_id(), 151645);
  EXPECT_EQ(t.eos_id(), 151645);  // tokenizer_config.json: eos_token <|im_end|>
  EXPECT_EQ(t.pad_id(), 151643);
  EXPECT_GE(t.vocab_size(), 151665u);
  EXPECT_EQ(t.token_to_id("Ġhello"), 23811);
  EXPECT_EQ(t.id_to_token(23811), "Ġhello");
  EXPECT_TRUE(t.is_special(151643));
  EXPECT_FALSE(t.is_special(t.token_to_id("<tool_call>")));
  EXPECT_EQ(t.token_to_id("no such token"), kNoToken);
}

void check_chat(const Tokenizer& qwen, const Tokenizer& chatml, const std::string& dir) {
  auto cases = json::parse(read_file(data_dir() + "/chat_cases.json"), "chat_cases.json");
  auto golden = test::read_jsonl(dir + "/golden_chat.jsonl");
  ASSERT_EQ(golden.size(), 2 * cases.Size());
  for (size_t i = 0; i < golden.size(); ++i) {
    const auto& g = golden[i];
    const auto& c = cases[static_cast<rapidjson::SizeType>(i % cases.Size())];
    SCOPED_TRACE(str(g["template"]) + "/" + str(g["name"]));
    std::vector<Message> msgs;
    for (const auto& m : c["messages"].GetArray()) msgs.push_back({str(m["role"]), str(m["content"])});
    const Tokenizer& t = str(g["template"]) == "qwen2.5" ? qwen : chatml;
    ChatEncoding e = t.render_chat(msgs, c["add_generation_prompt"].GetBool());
    EXPECT_EQ(e.text, str(g["text"]));
    EXPECT_EQ(e.ids, ids_of(g["ids"]));
    // The mask covers exactly the assistant contents and their <|im_end|>.
    std::string expect;
    for (const auto& m : msgs)
      if (m.role == "assistant") expect += m.content + "<|im_end|>";
    std::vector<TokenId> masked;
    for (size_t k = 0; k < e.ids.size(); ++k)
      if (e.assistant_mask[k]) masked.push_back(e.ids[k]);
    std::string got = t.decode(masked);
    // A leading newline of an assistant content merges with the header's: that token is in the mask.
    if (str(g["name"]) == "unicode_and_newlines") {
      EXPECT_EQ(got, "\n" + expect);
    } else {
      EXPECT_EQ(got, expect);
    }
  }
}

TEST_F(Qwen, ChatMatchesHfJinja) {
  Tokenizer qwen = load();
  EXPECT_EQ(qwen.chat_template(), ChatTemplate::kQwen25);
  check_chat(qwen, load(ChatTemplate::kChatML), data_dir());
}

TEST_F(Qwen, ChatTemplateRecognition) {
  // Qwen2.5 base models: same template, other default system prompt.
  std::string base = config_;
  const std::string qwen_sys = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
  for (size_t p; (p = base.find(qwen_sys)) != std::string::npos;) base.replace(p, qwen_sys.size(), "You are a helpful assistant.");
  Tokenizer b = load(ChatTemplate::kAuto, base);
  EXPECT_EQ(b.render_chat_text({{"user", "hi"}}),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n");
  // Plain ChatML.
  std::string chatml = read_file(data_dir() + "/chatml_chat_template.jinja");
  rapidjson::Document d(rapidjson::kObjectType);
  d.AddMember("chat_template", rapidjson::Value(chatml.c_str(), d.GetAllocator()), d.GetAllocator());
  EXPECT_EQ(load(ChatTemplate::kAuto, json::to_string(d)).chat_template(), ChatTemplate::kChatML);
  // A changed literal is not Qwen2.5's template any more: auto renders it as it is.
  std::string changed = config_;
  changed.replace(changed.find("'<|im_start|>assistant\\\\n'"), 27, "'<|im_start|>assistant: '");
  Tokenizer c = load(ChatTemplate::kAuto, changed);
  EXPECT_EQ(c.chat_template(), ChatTemplate::kJinja);
  std::string gen = c.render_chat_text({{"user", "hi"}}, true);
  EXPECT_EQ(gen.substr(gen.size() - 23), "<|im_start|>assistant: ");
  // Qwen3's template (the tokenizer folder's tokenizer_config.json) works under auto: an assistant
  // turn gets the empty think block; qwen2.5 overrides it.
  std::string qwen3 = test::qwen_tokenizer_json();
  qwen3 = qwen3.substr(0, qwen3.rfind('/')) + "/tokenizer_config.json";
  if (path_exists(qwen3) && read_file(qwen3).find("<think>") != std::string::npos) {
    Tokenizer q3 = load(ChatTemplate::kAuto, read_file(qwen3));
    EXPECT_EQ(q3.chat_template(), ChatTemplate::kJinja);
    EXPECT_EQ(q3.render_chat_text({{"user", "hi"}, {"assistant", "yo"}}),
              "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nyo<|im_end|>\n");
    EXPECT_EQ(load(ChatTemplate::kQwen25, read_file(qwen3)).chat_template(), ChatTemplate::kQwen25);
  }
}

TEST_F(Qwen, BatchOnAllCoresEqualsSerial) {
  Tokenizer t = load();
  std::vector<std::string> texts;
  for (const auto& c : test::read_jsonl(data_dir() + "/corpus.jsonl"))
    if (c.HasMember("text")) texts.push_back(str(c["text"]) + str(c["text"]));
  while (texts.size() < 2000) texts.push_back(texts[texts.size() % 300]);
  auto batch = t.encode_batch(texts);
  for (size_t i = 0; i < texts.size(); ++i) ASSERT_EQ(batch[i], t.encode(texts[i])) << i;
}

// The case with Qwen2.5's vocabulary: "Describe it." + "Making" is '.M'|'aking' as one text
// (HF tokenizers gives 1321, 1765), so the one-text mask left 'M' untrained; apart it is '.'|'Making'
// (13 | 42246), the ids generation sees after the prompt, with all of "Making" trained.
TEST_F(Qwen, PromptCompletionApartKeepsTheCompletionsFirstCharacters) {
  Tokenizer t = load(ChatTemplate::kQwen25);
  auto joint = t.encode_prompt_completion("Describe it.", "Making", false);
  EXPECT_EQ(joint.ids, (std::vector<TokenId>{74785, 432, 1321, 1765}));
  EXPECT_EQ(joint.completion_mask, (std::vector<uint8_t>{0, 0, 0, 1}));  // '.M' not trained
  bool merged = false;
  auto r = encode_prompt_completion_apart(t, "Describe it.", "Making", true, SIZE_MAX, &merged);
  EXPECT_EQ(r.ids, (std::vector<TokenId>{74785, 432, 13, 42246, t.eos_id()}));
  EXPECT_EQ(r.completion_mask, (std::vector<uint8_t>{0, 0, 0, 1, 1}));
  EXPECT_EQ(r.prompt_tokens, 3u);
  EXPECT_EQ(t.decode({r.ids[3]}), "Making");
  EXPECT_TRUE(merged);
  // A leading space starts its own pre-token: nothing merges.
  auto s = encode_prompt_completion_apart(t, "Describe it.", " Making", true, SIZE_MAX, &merged);
  EXPECT_EQ(s.ids, t.encode_prompt_completion("Describe it.", " Making", true).ids);
  EXPECT_FALSE(merged);
}

// Regenerates the golden files with the Python references now and compares them to the committed
// ones and to ptk (catches a golden file edited by hand or a reference that changed).
TEST_F(Qwen, LiveAgainstPythonReference) {
  std::string py = ptk::test::reference_python();
  if (py.empty()) PTK_SKIP_WITHOUT("venv") << "no .venv/bin/python3: live comparison skipped (scripts/setup.sh makes it)";
  ptk::test::TempDir out;
  auto r = ptk::test::run(py + " " + ptk::test::source_dir() + "/tests/tokenizer/make_golden.py --tokenizer " + path_ +
                          " --out " + out.path());
  ASSERT_EQ(r.exit_code, 0) << r.out;
  for (const char* f : {"golden_qwen.jsonl", "golden_chat.jsonl", "golden_decode.jsonl", "golden_tiny.jsonl"})
    EXPECT_EQ(read_file(out.file(f)), read_file(data_dir() + "/" + f)) << f << " differs from a fresh run of make_golden.py";
  check_corpus(load(), out.path());
  check_chat(load(), load(ChatTemplate::kChatML), out.path());
}

}  // namespace
}  // namespace ptk::tokenizer
