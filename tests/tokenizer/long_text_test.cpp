// Long texts in bounded memory on Qwen's vocabulary: encode_head (a prefix of head_bytes(n) bytes),
// encode_tail (windows over a huge pre-token) and the bounded render_chat / encode_prompt_completion
// give exactly the ids of encoding the whole text and then cutting the ids, on real text and on
// adversarial ones (one huge word, a huge run of spaces, multi-byte characters and NFC compositions
// at the cut, special tokens across it, the longest tokens). The first test checks the assumption
// head_bytes rests on directly: cutting a text changes no id that ends more than the margin before
// the cut, at every cut position in windows around the hard spots. Skips when Qwen's tokenizer.json
// is absent.
#include <gtest/gtest.h>

#include <random>

#include "core/tokenizer/prompt_completion.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/error.h"
#include "tests/tokenizer/golden.h"
#include "tests/support/test_util.h"

namespace ptk::tokenizer {
namespace {

using test::data_dir;

// GPT-2's byte alphabet backwards: code point -> byte (-1 outside it).
int alphabet_byte(uint32_t cp) {
  static const std::vector<int> table = [] {
    std::vector<int> t(512, -1);
    std::vector<int> bs;
    for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
    for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
    for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
    std::vector<bool> in(256, false);
    for (int b : bs) in[static_cast<size_t>(b)] = true, t[static_cast<size_t>(b)] = b;
    int n = 0;
    for (int b = 0; b < 256; ++b)
      if (!in[static_cast<size_t>(b)]) t[static_cast<size_t>(256 + n++)] = b;
    return t;
  }();
  return cp < table.size() ? table[cp] : -1;
}

// Bytes of text each id stands for (its vocabulary form through the byte alphabet; an added token's
// content is printable ASCII, which the alphabet maps to itself).
std::vector<size_t> id_lengths(const Tokenizer& t, const std::vector<TokenId>& ids) {
  std::vector<size_t> out;
  for (TokenId id : ids) {
    std::string s = t.id_to_token(id);
    size_t n = 0;
    for (size_t i = 0; i < s.size();) {
      unsigned char c = static_cast<unsigned char>(s[i]);
      size_t len = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
      uint32_t cp = len == 1 ? c : c & (0xFF >> (len + 1));
      for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
      EXPECT_GE(alphabet_byte(cp), 0) << "token " << id << " " << s;
      ++n;
      i += len;
    }
    out.push_back(n);
  }
  return out;
}

std::vector<TokenId> first(const std::vector<TokenId>& v, size_t n) {
  return std::vector<TokenId>(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(std::min(n, v.size())));
}
std::vector<TokenId> last(const std::vector<TokenId>& v, size_t n) {
  return std::vector<TokenId>(v.end() - static_cast<std::ptrdiff_t>(std::min(n, v.size())), v.end());
}

// Real text: the tokenizer corpus (English, code, CJK, Arabic, emoji, ...) repeated to `bytes`.
std::string real_text(size_t bytes) {
  std::string one;
  for (const auto& d : test::read_jsonl(data_dir() + "/corpus.jsonl")) one += test::str(d["text"]) + "\n";
  std::string out;
  while (out.size() < bytes) out += one;
  return out;
}

// Characters picked at random from `alphabet` (UTF-8 strings) up to `bytes`.
std::string random_of(const std::vector<std::string>& alphabet, size_t bytes, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string out;
  while (out.size() < bytes) out += alphabet[rng() % alphabet.size()];
  return out;
}

struct Adversarial {
  std::string name, text;
  bool nfc_shrinks = false;  // NFC composes: a normalized byte may stand for up to 3 bytes of text
};

// Texts where ids are long or span much: about `bytes` each.
std::vector<Adversarial> adversarial(size_t bytes) {
  std::vector<std::string> letters, cjk, emoji, decomposed;
  for (char c = 'a'; c <= 'z'; ++c) letters.push_back(std::string(1, c));
  for (const char* s : {"é", "ß", "ñ", "ø"}) letters.push_back(s);
  for (const char* s : {"的", "一", "是", "在", "不", "了", "有", "和", "人", "这", "中", "大"}) cjk.push_back(s);
  for (const char* s : {"😀", "🎉", "👍", "🚀", "🙂"}) emoji.push_back(s);
  // e + U+0301 (composes to é), Hangul jamo L V T (compose to one syllable), plain letters between.
  for (const char* s : {"e\xCC\x81", "\xE1\x84\x80\xE1\x85\xA1\xE1\x86\xA8", "a", "n\xCC\x83", " "}) decomposed.push_back(s);
  std::string specials;
  std::string base = real_text(bytes);
  for (size_t i = 0; i < base.size(); i += 37) {
    specials += base.substr(i, 37);
    specials += i % 74 ? "<|im_end|>" : "<|im_start|>";
  }
  return {
      {"one huge word", random_of(letters, bytes, 1)},
      {"one letter repeated", std::string(bytes, 'a')},
      {"a run of spaces", "x" + std::string(bytes, ' ') + "y"},
      {"a run of spaces ending in a newline", "x" + std::string(bytes, ' ') + "\nyz"},
      {"mixed whitespace", random_of({" ", "\n", "\t", "  ", "\r\n"}, bytes, 2)},
      {"cjk without spaces", random_of(cjk, bytes, 3)},
      {"emoji", random_of(emoji, bytes, 4)},
      {"nfc compositions", random_of(decomposed, bytes, 5), true},
      {"special tokens every 37 bytes", specials},
      {"the longest tokens", "//" + std::string(bytes, '-')},
      {"digits", random_of({"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"}, bytes, 6)},
  };
}

class LongText : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string path = test::qwen_tokenizer_json();
    if (path.empty())
      PTK_SKIP_WITHOUT("qwen-tokenizer") << "Qwen tokenizer.json not found (assets/tokenizers/qwen/ or ../shared/tokenizers/qwen): "
                      "run scripts/setup.sh with ../shared beside the checkout";
    json_ = read_file(path);
    tok_ = std::make_unique<Tokenizer>(
        Tokenizer::from_json(json_, read_file(data_dir() + "/qwen2.5_tokenizer_config.json"), path));
  }
  const Tokenizer& tok() const { return *tok_; }
  size_t margin() const { return Tokenizer::kHeadMarginIds * tok().longest_token_bytes(); }
  std::string json_;
  std::unique_ptr<Tokenizer> tok_;
};

TEST_F(LongText, Bounds) {
  EXPECT_EQ(tok().longest_token_bytes(), 128u);  // 128 spaces
  EXPECT_EQ(tok().head_bytes(100), (100 + Tokenizer::kHeadMarginIds) * 3 * 128);
  EXPECT_EQ(tok().head_bytes(SIZE_MAX), SIZE_MAX);
  EXPECT_EQ(utf8_head("a\xC3\xA9z", 2), "a\xC3\xA9");  // never inside a character: forward to its end
  EXPECT_EQ(utf8_head("abc", 5), "abc");
  // An added token that strips whitespace makes one id cover any number of bytes: no bound, no cut.
  std::string json = json_;
  size_t at = json.find("\"lstrip\": false");
  ASSERT_NE(at, std::string::npos);
  json.replace(at, 15, "\"lstrip\": true");
  Tokenizer lstrip = Tokenizer::from_json(json);
  EXPECT_EQ(lstrip.head_bytes(10), SIZE_MAX);
  std::string spaces = std::string(300000, ' ') + "<|endoftext|>x";
  EXPECT_EQ(lstrip.encode_head(spaces, 2), first(lstrip.encode(spaces), 2));
}

// The assumption behind head_bytes, checked at every cut in windows around the hard spots: the ids of
// a text cut at c agree with the whole text's ids up to the last one ending `margin` bytes before c
// (for NFC-composing text, 3 * that id's end in normalized bytes, as head_bytes counts).
TEST_F(LongText, CuttingChangesOnlyIdsNearTheCut) {
  const size_t M = margin();
  std::vector<Adversarial> texts = adversarial(4 * M);
  texts.push_back({"real text", real_text(4 * M)});
  std::mt19937 rng(7);
  for (const auto& t : texts) {
    SCOPED_TRACE(t.name);
    std::vector<TokenId> whole = tok().encode(t.text);
    std::vector<size_t> len = id_lengths(tok(), whole);
    std::vector<size_t> cuts;
    for (size_t c = 2 * M - 80; c < 2 * M + 80; ++c) cuts.push_back(c);  // every byte around one spot
    for (int k = 0; k < 30; ++k) cuts.push_back(M + 1 + rng() % (3 * M - 1));
    size_t compared = 0;
    for (size_t c : cuts) {
      std::string_view cut = utf8_head(t.text, c);
      std::vector<TokenId> ids = tok().encode(cut);
      size_t end = 0, safe = 0;
      const size_t f = t.nfc_shrinks ? 3 : 1;
      while (safe < whole.size() && (end + len[safe]) * f + M <= cut.size()) end += len[safe++];
      ASSERT_GE(ids.size(), safe) << "cut at " << c;
      for (size_t i = 0; i < safe; ++i)
        ASSERT_EQ(ids[i], whole[i]) << "cut at byte " << cut.size() << " changed id " << i << " of " << safe
                                    << " that end at least " << M << " bytes before it";
      compared += safe;
    }
    EXPECT_GT(compared, cuts.size() * 10) << "the check compared almost nothing";
  }
}

TEST_F(LongText, EncodeHeadIsTheFirstIdsOfTheWhole) {
  for (size_t n : {size_t{1}, size_t{9}, size_t{200}}) {
    SCOPED_TRACE("n = " + std::to_string(n));
    const size_t bytes = tok().head_bytes(n) * 3 / 2;
    std::vector<Adversarial> texts = adversarial(bytes);
    texts.push_back({"real text", real_text(bytes)});
    for (const auto& t : texts) {
      SCOPED_TRACE(t.name);
      ASSERT_GT(t.text.size(), tok().head_bytes(n));  // the text is cut
      std::vector<TokenId> whole = tok().encode(t.text);
      EXPECT_EQ(tok().encode_head(t.text, n), first(whole, n));
      EXPECT_EQ(tok().encode_head(t.text, whole.size() + 5), whole);  // fewer ids than asked: all of them
    }
  }
}

// Pre-tokens longer than kTailWindowBytes are merged a window at a time, in encode_tail and in a
// bounded head (n whose head_bytes passes the window).
TEST_F(LongText, HugePreTokensByWindowsEqualTheWhole) {
  const size_t bytes = Tokenizer::kTailWindowBytes * 9 / 4;  // two whole windows and a rest
  std::vector<Adversarial> texts;
  for (auto& t : adversarial(bytes))
    if (t.name == "one huge word" || t.name == "one letter repeated" || t.name == "a run of spaces" ||
        t.name == "cjk without spaces" || t.name == "special tokens every 37 bytes")
      texts.push_back(std::move(t));
  ASSERT_EQ(texts.size(), 5u);
  const size_t n_head = Tokenizer::kTailWindowBytes / (3 * tok().longest_token_bytes()) + 100;
  ASSERT_GT(tok().head_bytes(n_head), Tokenizer::kTailWindowBytes);
  for (const auto& t : texts) {
    SCOPED_TRACE(t.name);
    std::vector<TokenId> whole = tok().encode(t.text);
    for (size_t n : {size_t{1}, whole.size() - 1}) {
      size_t total = 0;
      EXPECT_EQ(tok().encode_tail(t.text, n, &total), last(whole, n)) << "n = " << n;
      EXPECT_EQ(total, whole.size());
    }
    EXPECT_EQ(tok().encode_head(t.text, n_head), first(whole, n_head));
  }
}

TEST_F(LongText, EncodeTailOfRealTextDropsAsItGoes) {
  std::string text = real_text(6 << 20);
  std::vector<TokenId> whole = tok().encode(text);
  for (size_t n : {size_t{0}, size_t{3}, size_t{4097}}) {
    size_t total = 0;
    EXPECT_EQ(tok().encode_tail(text, n, &total), last(whole, n));
    EXPECT_EQ(total, whole.size());
  }
}

TEST_F(LongText, BoundedChatIsTheTruncatedWhole) {
  const size_t n = 300, big = tok().head_bytes(n) * 2;
  std::string huge_word = adversarial(big)[0].text, prose = real_text(big);
  std::vector<std::vector<Message>> convs = {
      {{"user", prose}, {"assistant", "ok"}},
      {{"user", "hi"}, {"assistant", huge_word}},
      {{"system", std::string(big, ' ')}, {"user", "hi"}, {"assistant", prose}},
      {{"user", "a"}, {"assistant", "b"}, {"user", prose.substr(0, big / 3)}, {"assistant", prose.substr(0, big / 3)},
       {"user", "c"}, {"assistant", "d"}},
      // the cut inside a special-token-looking content, and right at a message boundary
      {{"user", std::string(tok().head_bytes(n) - 5, 'x') + "<|im_end|><|im_start|>"}, {"assistant", prose}},
      {{"user", std::string(tok().head_bytes(n), 'y')}, {"assistant", prose}},
  };
  for (size_t k = 0; k < convs.size(); ++k) {
    SCOPED_TRACE("conversation " + std::to_string(k));
    for (bool gen : {false, true}) {
      ChatEncoding whole = tok().render_chat(convs[k], gen);
      ChatEncoding cut = tok().render_chat(convs[k], gen, n);
      ASSERT_GT(whole.ids.size(), n);
      EXPECT_EQ(cut.text, whole.text);  // the whole rendering (templates may render early turns by later ones)
      EXPECT_EQ(cut.ids, first(whole.ids, n));
      EXPECT_EQ(cut.assistant_mask,
                std::vector<uint8_t>(whole.assistant_mask.begin(), whole.assistant_mask.begin() + static_cast<std::ptrdiff_t>(n)));
    }
  }
  // head_messages copies no more than it keeps, and a short conversation is left whole.
  std::vector<Message> one{{"user", prose}};
  auto h = head_messages({&one, &convs[0]}, 1000);
  ASSERT_EQ(h.size(), 1u);
  EXPECT_EQ(h[0].content, utf8_head(prose, 1000));
  EXPECT_EQ(tok().render_chat(convs[1], false, 1 << 30).ids, tok().render_chat(convs[1]).ids);
}

TEST_F(LongText, BoundedPromptCompletionIsTheTruncatedWhole) {
  const size_t n = 300, big = tok().head_bytes(n) * 2;
  std::string prose = real_text(big), word = adversarial(big)[0].text;
  struct Case {
    std::string prompt, completion;
  };
  std::vector<Case> cases = {
      {prose, "short answer"},                       // the prompt alone passes the budget
      {"short question", prose},                     // the completion is cut
      {std::string(utf8_head(prose, tok().head_bytes(n) - 3)), word},  // the boundary right at the cut
      {word, word},
      {std::string(big, ' '), prose},
  };
  for (size_t k = 0; k < cases.size(); ++k) {
    SCOPED_TRACE("case " + std::to_string(k));
    for (bool eos : {true, false}) {
      auto whole = tok().encode_prompt_completion(cases[k].prompt, cases[k].completion, eos);
      auto cut = tok().encode_prompt_completion(cases[k].prompt, cases[k].completion, eos, n);
      ASSERT_GT(whole.ids.size(), n);
      EXPECT_EQ(cut.ids, first(whole.ids, n));
      EXPECT_EQ(cut.completion_mask,
                std::vector<uint8_t>(whole.completion_mask.begin(), whole.completion_mask.begin() + static_cast<std::ptrdiff_t>(n)));
      EXPECT_EQ(cut.prompt_tokens, std::min(whole.prompt_tokens, n));
    }
  }
}

// The same for prompt and completion tokenized apart (prepare's plain-text prompt/completion): the
// bounded result is the first n of the whole one, and boundary_merged says whether the one-text
// encoding differs within those n ids.
TEST_F(LongText, BoundedPromptCompletionApartIsTheTruncatedWhole) {
  const size_t n = 300, big = tok().head_bytes(n) * 2;
  std::string prose = real_text(big), word = adversarial(big)[0].text;
  const std::pair<std::string, std::string> cases[] = {
      {prose, "short answer"},
      {"short question", prose},
      {std::string(utf8_head(prose, tok().head_bytes(n) - 3)), word},
      {"a question.", word},  // '.' + letters: one pre-token as one text
      {word, word},
      {std::string(big, ' '), prose},
  };
  for (size_t k = 0; k < std::size(cases); ++k) {
    SCOPED_TRACE("case " + std::to_string(k));
    const auto& [p, c] = cases[k];
    for (bool eos : {true, false}) {
      bool merged_whole = false, merged_cut = false;
      auto whole = encode_prompt_completion_apart(tok(), p, c, eos, SIZE_MAX, &merged_whole);
      auto cut = encode_prompt_completion_apart(tok(), p, c, eos, n, &merged_cut);
      std::vector<TokenId> want = tok().encode(p), ci = tok().encode(c);
      want.insert(want.end(), ci.begin(), ci.end());
      if (eos) want.push_back(tok().eos_id());
      EXPECT_EQ(whole.ids, want);
      EXPECT_EQ(whole.prompt_tokens, tok().encode(p).size());
      ASSERT_GT(whole.ids.size(), n);
      EXPECT_EQ(cut.ids, first(whole.ids, n));
      EXPECT_EQ(cut.completion_mask,
                std::vector<uint8_t>(whole.completion_mask.begin(), whole.completion_mask.begin() + static_cast<std::ptrdiff_t>(n)));
      EXPECT_EQ(cut.prompt_tokens, std::min(whole.prompt_tokens, n));
      std::vector<TokenId> one = tok().encode(p + c);
      if (eos) one.push_back(tok().eos_id());
      EXPECT_EQ(merged_whole, one != whole.ids);
      EXPECT_EQ(merged_cut, first(one, n) != cut.ids);
    }
  }
}

}  // namespace
}  // namespace ptk::tokenizer
