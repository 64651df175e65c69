// prepare on records far longer than max_seq_len, with Qwen's tokenizer: what prepare writes (it
// encodes only what can survive truncation, see prepare.cpp) equals encoding every text whole and
// then truncating as prepare always did — per format and per truncation rule: sft (first L ids,
// completion and assistant masks, prompt/completion boundary), preference (prompt cut from the
// left to keep its end, replies from the right), rl (a prompt over L is dropped), with
// overlong=truncate and drop. Texts: real prose, one huge word, a run of spaces, multi-byte
// characters, special tokens where the cut falls. Skips when Qwen's tokenizer.json is absent.
#include <gtest/gtest.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <algorithm>
#include <map>
#include <random>

#include "core/tokenizer/tokenizer.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "datasets/loader.h"
#include "datasets/prepare.h"
#include "tests/support/test_util.h"

namespace ptk::data {
namespace {

using tokenizer::Message;
using tokenizer::Tokenizer;
using tokenizer::TokenId;
using Ids = std::vector<uint32_t>;

// A JSON value for one record field: a string or a message list.
struct Field {
  bool messages = false;
  std::string text;
  std::vector<Message> list;
  Field(std::string t) : text(std::move(t)) {}  // NOLINT: records read as {"prompt": "..."}
  Field(const char* t) : text(t) {}             // NOLINT
  Field(std::vector<Message> m) : messages(true), list(std::move(m)) {}  // NOLINT
};

std::string record_line(const std::vector<std::pair<std::string, Field>>& fields) {
  rapidjson::StringBuffer sb;
  rapidjson::Writer<rapidjson::StringBuffer> w(sb);
  w.StartObject();
  for (const auto& [k, f] : fields) {
    w.Key(k.c_str());
    if (!f.messages) {
      w.String(f.text.data(), static_cast<rapidjson::SizeType>(f.text.size()));
      continue;
    }
    w.StartArray();
    for (const auto& m : f.list) {
      w.StartObject();
      w.Key("role");
      w.String(m.role.c_str());
      w.Key("content");
      w.String(m.content.data(), static_cast<rapidjson::SizeType>(m.content.size()));
      w.EndObject();
    }
    w.EndArray();
  }
  w.EndObject();
  return std::string(sb.GetString(), sb.GetSize()) + "\n";
}

Ids u32(const std::vector<TokenId>& v) { return Ids(v.begin(), v.end()); }
std::string head(const std::string& s, size_t bytes) { return std::string(tokenizer::utf8_head(s, bytes)); }

class LongRecords : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string json = test::qwen_tokenizer_json();
    if (json.empty()) PTK_SKIP_WITHOUT("qwen-tokenizer") << "Qwen tokenizer.json not found (assets/tokenizers/qwen/): run scripts/setup.sh";
    tok_path_ = parent_dir(json);
    tokenizer::LoadOptions lo;
    lo.chat_template = tokenizer::ChatTemplate::kQwen25;
    tok_ = std::make_unique<Tokenizer>(Tokenizer::load(tok_path_, lo));
    // Texts past the cut prepare makes for max_seq_len L (head_bytes(L + 1)), each with its hard spot there.
    const size_t cut = tok_->head_bytes(kL + 1), big = cut + cut / 2;
    std::string one;
    for (const auto& line : {"The quick brown fox jumps over the lazy dog. ", "Supervised fine-tuning adapts a model.\n",
                             "通义千问2.5在数学和代码方面有显著提升。", "Ça va? 😀 déjà vu — naïve café. ", "x = f(y) + 42;\n\t"})
      one += line;
    while (prose_.size() < big) prose_ += one;
    std::mt19937 rng(3);
    while (word_.size() < big) word_ += static_cast<char>('a' + rng() % 26);
    spaces_ = "x" + std::string(big, ' ') + "y";
    specials_ = head(prose_, cut - 6) + "<|im_end|><|im_start|>" + head(prose_, cut / 2);
    std::string cjk;
    while (cjk.size() < cut - 1) cjk += "的";  // 3 bytes each: the cut falls inside one
    cjk_ = cjk + head(prose_, cut / 2);
  }

  PrepareOptions options(const std::string& input, Format f, const std::string& overlong = "truncate") const {
    PrepareOptions o;
    o.format = f;
    o.sources = {{input, 1.0}};
    o.tokenizer_path = tok_path_;
    o.chat_template = "qwen2.5";
    o.max_seq_len = kL;
    o.packing = false;
    o.overlong = overlong;
    o.quiet = true;
    o.threads = 2;
    return o;
  }
  std::vector<std::string> texts() const { return {prose_, word_, spaces_, specials_, cjk_}; }

  static constexpr int64_t kL = 64;
  std::string tok_path_;
  std::unique_ptr<Tokenizer> tok_;
  std::string prose_, word_, spaces_, specials_, cjk_;
  test::TempDir dir_;
};

// sft, the way prepare did it before bounding: encode the whole record, then keep the first L.
struct SftDoc {
  Ids ids;
  std::vector<uint8_t> mask;
  uint32_t seg_a = 0;
  bool truncated = false;
};

SftDoc whole_sft(const Tokenizer& t, const std::vector<std::pair<std::string, Field>>& rec, size_t L) {
  SftDoc d;
  std::vector<TokenId> ids;
  if (rec[0].first == "text") {
    ids = t.encode(rec[0].second.text);
    ids.push_back(t.eos_id());
    d.mask.assign(ids.size(), 1);
  } else if (rec[0].first == "messages") {
    auto e = t.render_chat(rec[0].second.list);
    ids = e.ids;
    d.mask = e.assistant_mask;
  } else if (!rec[0].second.messages) {
    // Prompt and completion encoded apart, as at generation, then the EOS (kPrepareVersion 4).
    ids = t.encode(rec[0].second.text);
    d.seg_a = static_cast<uint32_t>(ids.size());
    std::vector<TokenId> c = t.encode(rec[1].second.text);
    ids.insert(ids.end(), c.begin(), c.end());
    ids.push_back(t.eos_id());
    d.mask.assign(ids.size(), 1);
    std::fill(d.mask.begin(), d.mask.begin() + d.seg_a, 0);
  } else {
    std::vector<Message> all = rec[0].second.list;
    all.insert(all.end(), rec[1].second.list.begin(), rec[1].second.list.end());
    ids = t.render_chat(all).ids;
    std::vector<TokenId> prompt = t.render_chat(rec[0].second.list, true).ids;
    size_t p = 0;  // TRL's completion_mask: every token from the common prefix on
    while (p < prompt.size() && p < ids.size() && prompt[p] == ids[p]) ++p;
    d.mask.assign(ids.size(), 0);
    for (size_t i = p; i < ids.size(); ++i) d.mask[i] = 1;
    d.seg_a = static_cast<uint32_t>(p);
  }
  d.ids = u32(ids);
  if (d.ids.size() > L) {
    d.ids.resize(L);
    d.mask.resize(L);
    d.seg_a = std::min<uint32_t>(d.seg_a, static_cast<uint32_t>(L));
    d.truncated = true;
  }
  return d;
}

TEST_F(LongRecords, SftEqualsWholeThenTruncated) {
  std::vector<std::vector<std::pair<std::string, Field>>> recs;
  for (const auto& t : texts()) {
    recs.push_back({{"text", t}});
    recs.push_back({{"prompt", t}, {"completion", "the answer"}});
    recs.push_back({{"prompt", "a question"}, {"completion", t}});
    recs.push_back({{"messages", std::vector<Message>{{"user", t}, {"assistant", "ok"}}}});
    recs.push_back({{"messages", std::vector<Message>{{"system", "be brief"}, {"user", "hi"}, {"assistant", t}}}});
    recs.push_back({{"prompt", std::vector<Message>{{"user", t}}}, {"completion", std::vector<Message>{{"assistant", "ok"}}}});
    recs.push_back({{"prompt", std::vector<Message>{{"user", "q"}}}, {"completion", std::vector<Message>{{"assistant", t}}}});
  }
  recs.push_back({{"text", "short enough"}});  // and one that is not cut
  std::string in;
  for (const auto& r : recs) in += record_line(r);
  std::string input = dir_.write("sft.jsonl", in);
  for (const char* overlong : {"truncate", "drop"}) {
    SCOPED_TRACE(overlong);
    std::string out = dir_.file(std::string("sft-") + overlong);
    auto res = prepare(options(input, Format::kSft, overlong), out);
    auto set = PreparedSet::open(out);
    std::map<uint32_t, int64_t> doc_of_line;
    for (int64_t i = 0; i < set.num_docs(); ++i) doc_of_line[set.doc(i).entry->line] = i;
    int64_t truncated = 0, dropped = 0;
    for (size_t k = 0; k < recs.size(); ++k) {
      SCOPED_TRACE("record " + std::to_string(k + 1));
      SftDoc want = whole_sft(*tok_, recs[k], kL);
      truncated += want.truncated;
      auto it = doc_of_line.find(static_cast<uint32_t>(k + 1));
      // Dropped: over max_seq_len with overlong=drop, or (unpacked) left without a target by the cut.
      bool no_target = std::find(want.mask.begin(), want.mask.end(), uint8_t{1}) == want.mask.end();
      if (want.truncated && (std::string(overlong) == "drop" || no_target)) {
        EXPECT_EQ(it, doc_of_line.end());
        dropped += 1;
        continue;
      }
      ASSERT_NE(it, doc_of_line.end());
      DocView d = set.doc(it->second);
      EXPECT_EQ(d.ids.to_vector(), want.ids);
      EXPECT_EQ(d.mask.to_vector(), want.mask);
      EXPECT_EQ(d.entry->seg_a, want.seg_a);
    }
    EXPECT_EQ(truncated, static_cast<int64_t>(recs.size()) - 1);
    EXPECT_EQ(res.summary.dropped, dropped);
    EXPECT_EQ(res.summary.truncated, truncated - dropped);
    if (std::string(overlong) == "truncate") {
      EXPECT_GT(dropped, 0);  // the prompts longer than kL
    }
  }
}

struct PairDoc {
  Ids prompt, chosen, rejected;
  bool over = false;
};

// preference, the way prepare did it before bounding.
PairDoc whole_pair(const Tokenizer& t, const Field& prompt, const Field& chosen, const Field& rejected, size_t L) {
  std::vector<TokenId> p, c, rj;
  if (!prompt.messages) {
    p = t.encode(prompt.text);
    c = t.encode(chosen.text);
    c.push_back(t.eos_id());
    rj = t.encode(rejected.text);
    rj.push_back(t.eos_id());
  } else {
    std::string pt = t.render_chat_text(prompt.list, true);
    for (int k = 0; k < 2; ++k) {
      std::vector<Message> all = prompt.list;
      const auto& reply = k == 0 ? chosen.list : rejected.list;
      all.insert(all.end(), reply.begin(), reply.end());
      (k == 0 ? c : rj) = t.encode(t.render_chat_text(all).substr(pt.size()));
    }
    p = t.encode(pt);
  }
  PairDoc d;
  size_t longest = std::max(c.size(), rj.size());
  if (p.size() + longest > L) {
    d.over = true;
    size_t keep_p = std::min(p.size(), std::max(L / 2, L - std::min(longest, L)));
    p.erase(p.begin(), p.end() - static_cast<std::ptrdiff_t>(keep_p));
    if (c.size() > L - keep_p) c.resize(L - keep_p);
    if (rj.size() > L - keep_p) rj.resize(L - keep_p);
  }
  d.prompt = u32(p);
  d.chosen = u32(c);
  d.rejected = u32(rj);
  return d;
}

TEST_F(LongRecords, PreferenceEqualsWholeThenTruncated) {
  struct Rec {
    Field p, c, r;
  };
  std::vector<Rec> recs;
  // A prompt past the tail window, so that its huge word is merged a window at a time.
  std::string huge_prompt = word_;
  while (huge_prompt.size() < Tokenizer::kTailWindowBytes + Tokenizer::kTailWindowBytes / 4) huge_prompt += word_;
  recs.push_back({huge_prompt, "yes", "no"});
  for (const auto& t : texts()) {
    recs.push_back({t, "yes", "no"});        // the prompt keeps its end
    recs.push_back({"question", t, "no"});   // a reply keeps its start
    recs.push_back({t, t, t});
    recs.push_back({std::vector<Message>{{"user", t}}, std::vector<Message>{{"assistant", "A"}},
                    std::vector<Message>{{"assistant", "B"}}});
    recs.push_back({std::vector<Message>{{"system", "s"}, {"user", "q"}}, std::vector<Message>{{"assistant", t}},
                    std::vector<Message>{{"assistant", "B"}, {"user", "more"}, {"assistant", t}}});
  }
  recs.push_back({"short", "a", "b"});
  std::string in;
  for (const auto& r : recs) in += record_line({{"prompt", r.p}, {"chosen", r.c}, {"rejected", r.r}});
  std::string input = dir_.write("pref.jsonl", in);
  for (const char* overlong : {"truncate", "drop"}) {
    SCOPED_TRACE(overlong);
    std::string out = dir_.file(std::string("pref-") + overlong);
    prepare(options(input, Format::kPreference, overlong), out);
    auto set = PreparedSet::open(out);
    std::map<uint32_t, int64_t> row_of_line;
    for (int64_t i = 0; i < set.num_rows(); ++i) row_of_line[make_preference_batch(set, {i})[0].line] = i;
    for (size_t k = 0; k < recs.size(); ++k) {
      SCOPED_TRACE("record " + std::to_string(k + 1));
      PairDoc want = whole_pair(*tok_, recs[k].p, recs[k].c, recs[k].r, kL);
      EXPECT_EQ(want.over, k + 1 != recs.size());
      auto it = row_of_line.find(static_cast<uint32_t>(k + 1));
      if (want.over && std::string(overlong) == "drop") {
        EXPECT_EQ(it, row_of_line.end());
        continue;
      }
      ASSERT_NE(it, row_of_line.end());
      PairView got = make_preference_batch(set, {it->second})[0];
      EXPECT_EQ(got.prompt.to_vector(), want.prompt);
      EXPECT_EQ(got.chosen.to_vector(), want.chosen);
      EXPECT_EQ(got.rejected.to_vector(), want.rejected);
    }
  }
}

TEST_F(LongRecords, RlDropsExactlyThePromptsOverL) {
  std::vector<Field> prompts;
  for (const auto& t : texts()) {
    prompts.push_back(t);
    prompts.push_back(std::vector<Message>{{"user", t}});
  }
  // Just at the limit: L ids with the generation prompt, then one more.
  std::vector<Message> chat{{"user", "w"}};
  while (tok_->render_chat(chat, true).ids.size() < static_cast<size_t>(kL)) chat[0].content += " w";
  ASSERT_EQ(tok_->render_chat(chat, true).ids.size(), static_cast<size_t>(kL));
  prompts.push_back(chat);
  chat[0].content += " w";
  prompts.push_back(chat);
  std::string in;
  for (const auto& p : prompts) in += record_line({{"prompt", p}, {"answer", "7"}});
  std::string out = dir_.file("rl");
  auto res = prepare(options(dir_.write("rl.jsonl", in), Format::kRl), out);
  auto set = PreparedSet::open(out);
  ASSERT_EQ(set.num_docs(), 1);  // only the prompt of exactly L ids
  EXPECT_EQ(set.doc(0).entry->line, prompts.size() - 1);
  EXPECT_EQ(set.doc(0).ids.to_vector(), u32(tok_->render_chat(prompts[prompts.size() - 2].list, true).ids));
  EXPECT_EQ(res.summary.dropped, static_cast<int64_t>(prompts.size()) - 1);
}

}  // namespace
}  // namespace ptk::data
