// Datasets as they are: ShareGPT, Alpaca (with history), implicit-prompt preference pairs (TRL's
// extract_prompt, edge cases included), data.columns; the file formats (JSONL, JSON array, .gz of
// either) give the same prepared bytes; data.eval_split is a deterministic, format-independent
// partition; a file-level problem is one error naming the file and where.
#include <gtest/gtest.h>
#include <zlib.h>

#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <string>

#include "core/config/sections.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "datasets/byte_tokenizer.h"
#include "datasets/loader.h"
#include "datasets/prepare.h"
#include "datasets/readers.h"
#include "datasets/records.h"
#include "tests/support/test_util.h"

namespace ptk::data {
namespace {

namespace fs = std::filesystem;
using tokenizer::Message;

Record parse_ok(const std::string& json, Format f, const ParseOptions& po = {}) {
  Record r;
  std::string why;
  EXPECT_TRUE(parse_record(json, f, po, &r, &why)) << json << ": " << why;
  return r;
}

std::string reason_of(const std::string& json, Format f, const ParseOptions& po = {}) {
  Record r;
  std::string why;
  EXPECT_FALSE(parse_record(json, f, po, &r, &why)) << json;
  return why;
}

std::vector<std::pair<std::string, std::string>> msgs(const std::vector<Message>& m) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& x : m) out.emplace_back(x.role, x.content);
  return out;
}
using P = std::vector<std::pair<std::string, std::string>>;

TEST(Readers, ShareGptRolesMapLikeLlamaFactory) {
  Record r = parse_ok(R"({"system":"be brief","conversations":[{"from":"human","value":"hi"},{"from":"gpt","value":"yo"},)"
                      R"({"from":"user","value":"again"},{"from":"assistant","value":"ok"}]})",
                      Format::kSft);
  EXPECT_EQ(r.sft.kind, SftRecord::Kind::kMessages);
  EXPECT_EQ(msgs(r.sft.messages),
            (P{{"system", "be brief"}, {"user", "hi"}, {"assistant", "yo"}, {"user", "again"}, {"assistant", "ok"}}));
  // A system turn in the list wins over the field; role/content messages are read too.
  r = parse_ok(R"({"system":"x","conversations":[{"from":"system","value":"s"},{"role":"user","content":"q"},)"
               R"({"role":"assistant","content":"a"}]})",
               Format::kSft);
  EXPECT_EQ(msgs(r.sft.messages), (P{{"system", "s"}, {"user", "q"}, {"assistant", "a"}}));
  EXPECT_EQ(reason_of(R"({"conversations":[{"from":"human","value":"q"},{"from":"function_call","value":"{}"}]})", Format::kSft),
            "conversations[1].from \"function_call\" is a tool turn (tool calls are not supported)");
  EXPECT_EQ(reason_of(R"({"conversations":[{"from":"bot","value":"q"}]})", Format::kSft),
            "conversations[0].from \"bot\" is not one of human, user, gpt, assistant, system");
  EXPECT_EQ(reason_of(R"({"conversations":[{"from":"human","value":"q"}]})", Format::kSft),
            "no assistant turn in \"conversations\" (nothing to train on)");
  EXPECT_EQ(reason_of(R"({"conversations":[{"from":"human"}]})", Format::kSft), "conversations[0].value missing");
}

TEST(Readers, AlpacaWithInputHistoryAndSystem) {
  // LLaMA-Factory's AlpacaDatasetConverter: user = "\n".join(non-empty instruction, input).
  Record r = parse_ok(R"({"instruction":"Translate","input":"chat","output":"cat"})", Format::kSft);
  EXPECT_EQ(msgs(r.sft.messages), (P{{"user", "Translate\nchat"}, {"assistant", "cat"}}));
  r = parse_ok(R"({"instruction":"Hi","input":"","output":"Hello","system":"S","history":[["q1","a1"],["q2","a2"]]})",
               Format::kSft);
  EXPECT_EQ(msgs(r.sft.messages), (P{{"system", "S"}, {"user", "q1"}, {"assistant", "a1"}, {"user", "q2"},
                                     {"assistant", "a2"}, {"user", "Hi"}, {"assistant", "Hello"}}));
  r = parse_ok(R"({"instruction":"","input":"only input","output":"o","history":null})", Format::kSft);
  EXPECT_EQ(msgs(r.sft.messages), (P{{"user", "only input"}, {"assistant", "o"}}));
  EXPECT_EQ(reason_of(R"({"instruction":"i","input":""})", Format::kSft),
            "missing field \"output\" (an Alpaca record: instruction, input, output)");
  EXPECT_EQ(reason_of(R"({"instruction":"i","output":""})", Format::kSft), "empty \"output\"");
  EXPECT_EQ(reason_of(R"({"instruction":"i","output":"o","history":[["q"]]})", Format::kSft),
            "history[0] must be a [question, answer] pair of strings");
  // rl: the prompt's messages, the answer from "answer" or else "output".
  r = parse_ok(R"({"instruction":"2+2?","output":"4"})", Format::kRl);
  EXPECT_TRUE(r.rl.prompt.is_messages);
  EXPECT_EQ(msgs(r.rl.prompt.messages), (P{{"user", "2+2?"}}));
  EXPECT_EQ(r.rl.answer, "4");
  // preference: chosen/rejected fields, or LLaMA-Factory's older "output": [chosen, rejected].
  r = parse_ok(R"({"instruction":"q","chosen":"good","rejected":"bad"})", Format::kPreference);
  EXPECT_EQ(msgs(r.preference.prompt.messages), (P{{"user", "q"}}));
  EXPECT_EQ(msgs(r.preference.chosen.messages), (P{{"assistant", "good"}}));
  r = parse_ok(R"({"instruction":"q","input":"x","output":["good","bad"]})", Format::kPreference);
  EXPECT_EQ(msgs(r.preference.prompt.messages), (P{{"user", "q\nx"}}));
  EXPECT_EQ(msgs(r.preference.rejected.messages), (P{{"assistant", "bad"}}));
  r = parse_ok(R"({"instruction":"q","output":["best","second","third"]})", Format::kPreference);  // ranked: first two
  EXPECT_EQ(msgs(r.preference.chosen.messages), (P{{"assistant", "best"}}));
  EXPECT_EQ(msgs(r.preference.rejected.messages), (P{{"assistant", "second"}}));
}

TEST(Readers, ShareGptPreferenceAndRl) {
  // LLaMA-Factory's dpo_en_demo: chosen/rejected as {"from","value"}; MedicalGPT's: strings.
  Record r = parse_ok(R"({"conversations":[{"from":"human","value":"q"}],"chosen":{"from":"gpt","value":"good"},)"
                      R"("rejected":{"from":"gpt","value":"bad"}})",
                      Format::kPreference);
  EXPECT_EQ(msgs(r.preference.prompt.messages), (P{{"user", "q"}}));
  EXPECT_EQ(msgs(r.preference.chosen.messages), (P{{"assistant", "good"}}));
  r = parse_ok(R"({"conversations":[{"from":"human","value":"q"}],"chosen":"good","rejected":"bad"})", Format::kPreference);
  EXPECT_EQ(msgs(r.preference.rejected.messages), (P{{"assistant", "bad"}}));
  EXPECT_EQ(reason_of(R"({"conversations":[{"from":"human","value":"q"}],"chosen":"good"})", Format::kPreference),
            "missing field \"rejected\"");
  // rl: without "answer", a last assistant turn is the answer.
  r = parse_ok(R"({"conversations":[{"from":"human","value":"2+2?"},{"from":"gpt","value":"4"}]})", Format::kRl);
  EXPECT_EQ(msgs(r.rl.prompt.messages), (P{{"user", "2+2?"}}));
  EXPECT_EQ(r.rl.answer, "4");
  r = parse_ok(R"({"conversations":[{"from":"human","value":"2+2?"}],"answer":4})", Format::kRl);
  EXPECT_EQ(r.rl.answer, "4");
}

struct Split3 {
  std::string prompt, chosen, rejected;
};
Split3 extract(const std::string& c, const std::string& r) {
  Split3 s;
  std::string why;
  EXPECT_TRUE(extract_prompt(c, r, &s.prompt, &s.chosen, &s.rejected, &why)) << why;
  return s;
}

// Expected values are what trl.data_utils.extract_prompt returns (tests/reference/readers_reference_test.py
// checks the same function against TRL itself on hh-rlhf-like records).
TEST(Readers, ImplicitPromptIsTrlsExtractPrompt) {
  Split3 s = extract("\n\nHuman: hi\n\nAssistant: hello there", "\n\nHuman: hi\n\nAssistant: go away");
  EXPECT_EQ(s.prompt, "\n\nHuman: hi\n\nAssistant:");  // the space before the replies goes back to them
  EXPECT_EQ(s.chosen, " hello there");
  EXPECT_EQ(s.rejected, " go away");
  s = extract("ab", "ac");
  EXPECT_EQ(s.prompt, "a");
  // Code points, not bytes: "é" (C3 A9) and "è" (C3 A8) share a byte, not a character.
  s = extract("x \xC3\xA9", "x \xC3\xA8");
  EXPECT_EQ(s.prompt, "x");
  EXPECT_EQ(s.chosen, " \xC3\xA9");
  // No difference within the shorter one: the loop leaves idx at min - 1.
  s = extract("abc", "abcdef");
  EXPECT_EQ(s.prompt, "ab");
  EXPECT_EQ(s.chosen, "c");
  EXPECT_EQ(s.rejected, "cdef");
  // Different from the first character and chosen ends with " ": Python's chosen[-1] makes idx -1.
  s = extract("a ", "bc");
  EXPECT_EQ(s.prompt, "a");
  EXPECT_EQ(s.chosen, " ");
  EXPECT_EQ(s.rejected, "c");
  std::string p, c, r, why;
  EXPECT_FALSE(extract_prompt("", "x", &p, &c, &r, &why));
  EXPECT_EQ(why, "empty \"chosen\" (no prompt to extract)");

  // Message lists: the shared leading turns.
  Record rec = parse_ok(R"({"chosen":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}],)"
                        R"("rejected":[{"role":"user","content":"q"},{"role":"assistant","content":"b"}]})",
                        Format::kPreference);
  EXPECT_EQ(msgs(rec.preference.prompt.messages), (P{{"user", "q"}}));
  EXPECT_EQ(msgs(rec.preference.chosen.messages), (P{{"assistant", "a"}}));
  EXPECT_EQ(msgs(rec.preference.rejected.messages), (P{{"assistant", "b"}}));
  EXPECT_EQ(reason_of(R"({"chosen":[{"role":"user","content":"q"}],"rejected":[{"role":"user","content":"r"}]})",
                      Format::kPreference),
            "\"chosen\" and \"rejected\" differ from their first message: no shared prompt to extract (give a \"prompt\" field)");
  EXPECT_EQ(reason_of(R"({"chosen":"a","rejected":[{"role":"user","content":"r"}]})", Format::kPreference),
            "\"chosen\" and \"rejected\" must both be strings or both be message lists");
  // Strings through parse_record.
  rec = parse_ok(R"({"chosen":"Q: hi A: yes","rejected":"Q: hi A: no"})", Format::kPreference);
  EXPECT_FALSE(rec.preference.prompt.is_messages);
  EXPECT_EQ(rec.preference.prompt.text, "Q: hi A:");
  EXPECT_EQ(rec.preference.rejected.text, " no");
}

TEST(Readers, ColumnMapping) {
  std::vector<std::pair<std::string, std::string>> cols{{"prompt", "question"}, {"completion", "response"}};
  ParseOptions po;
  po.columns = &cols;
  Record r = parse_ok(R"({"question":"2+2?","response":"4","id":7})", Format::kSft, po);
  EXPECT_EQ(r.sft.kind, SftRecord::Kind::kPromptCompletion);
  EXPECT_EQ(r.sft.prompt.text, "2+2?");
  EXPECT_EQ(r.sft.completion.text, "4");
  // The mapped column wins over a field of ptk's name; two names can be swapped.
  r = parse_ok(R"({"prompt":"ignored","question":"q","response":"a"})", Format::kSft, po);
  EXPECT_EQ(r.sft.prompt.text, "q");
  std::vector<std::pair<std::string, std::string>> swap{{"chosen", "rejected"}, {"rejected", "chosen"}};
  po.columns = &swap;
  r = parse_ok(R"({"prompt":"p","chosen":"worse","rejected":"better"})", Format::kPreference, po);
  EXPECT_EQ(r.preference.chosen.text, "better");
  EXPECT_EQ(r.preference.rejected.text, "worse");
  // rl keeps the renamed record (the verifier sees "answer").
  std::vector<std::pair<std::string, std::string>> gsm{{"prompt", "question"}};
  po.columns = &gsm;
  r = parse_ok(R"({"question":"q","answer":"#### 4"})", Format::kRl, po);
  EXPECT_EQ(r.rl.record_json, R"({"answer":"#### 4","prompt":"q"})");
  // A record without the mapped column says so.
  po.columns = &cols;
  EXPECT_EQ(reason_of(R"({"question":"q"})", Format::kSft, po),
            "missing field \"completion\"; the record has no column \"response\" (data.columns.completion)");
}

TEST(Readers, ParquetColumnsAreCheckedOnceForTheFormat) {
  std::string need;
  EXPECT_TRUE(columns_fit(Format::kSft, {"conversations", "id"}, {}, &need));
  EXPECT_FALSE(columns_fit(Format::kSft, {"question", "answer"}, {}, &need));
  EXPECT_EQ(need, "\"messages\" | \"conversations\" | \"prompt\" + \"completion\" | \"instruction\" + \"output\" | \"text\"");
  EXPECT_TRUE(columns_fit(Format::kSft, {"question", "answer"}, {{"prompt", "question"}, {"completion", "answer"}}, &need));
  EXPECT_TRUE(columns_fit(Format::kPreference, {"chosen", "rejected"}, {}, &need));  // implicit prompt
  EXPECT_FALSE(columns_fit(Format::kRl, {"question", "answer"}, {}, &need));
  EXPECT_EQ(need, "\"prompt\" + \"answer\" | \"conversations\" | \"instruction\" + \"answer\" | \"instruction\" + \"output\"");
}

TEST(Readers, ContentHashIgnoresWhitespaceAndMapping) {
  uint64_t a = 0, b = 0, c = 0;
  ParseOptions po;
  po.content_hash = &a;
  parse_ok(R"({"prompt":"p","completion":"c"})", Format::kSft, po);
  po.content_hash = &b;
  parse_ok("{\n  \"prompt\": \"p\",\n  \"completion\": \"c\"\n}", Format::kSft, po);
  EXPECT_EQ(a, b);
  std::vector<std::pair<std::string, std::string>> cols{{"prompt", "completion"}, {"completion", "prompt"}};  // hashed before renaming
  po.columns = &cols;
  po.content_hash = &c;
  parse_ok(R"({"prompt":"p","completion":"c"})", Format::kSft, po);
  EXPECT_EQ(a, c);
  parse_ok(R"({"prompt":"p","completion":"d"})", Format::kSft, po);
  EXPECT_NE(a, c);
  // A null column (JSONL written by `datasets`) hashes as the absent one (a Parquet row leaves it out).
  uint64_t with_null = 0;
  ParseOptions pn;
  pn.content_hash = &with_null;
  parse_ok(R"({"prompt":"p","system":null,"completion":"c"})", Format::kSft, pn);
  EXPECT_EQ(a, with_null);
}

void write_gz(const std::string& path, const std::string& content) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(gzwrite(f, content.data(), static_cast<unsigned>(content.size())), static_cast<int>(content.size()));
  gzclose(f);
}

std::vector<std::pair<std::string, std::string>> read_all(const std::string& path) {
  auto rr = open_records(path);
  std::vector<std::pair<std::string, std::string>> out;
  std::string text;
  RecordPos pos;
  while (rr->append_next(&text, &pos)) {
    out.emplace_back(record_position(path, rr->kind(), pos), text);
    text.clear();
  }
  return out;
}

TEST(Readers, FileFormatsAndPositions) {
  test::TempDir dir;
  const std::string jsonl = dir.write("a.jsonl", "{\"a\":1}\n{\"b\":\"x]\\\"}\"}\n");
  const std::string arr = dir.write("a.json", "[\n  {\"a\": 1},\n  {\"b\": \"x]\\\"}\",\n   \"c\": [1, {}]}\n]\n");
  auto r = read_all(jsonl);
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[1].first, jsonl + ":2");
  r = read_all(arr);
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].first, arr + ":record 1 (line 2)");
  EXPECT_EQ(r[0].second, "{\"a\": 1}");
  EXPECT_EQ(r[1].first, arr + ":record 2 (line 3)");
  EXPECT_EQ(r[1].second, "{\"b\": \"x]\\\"}\",\n   \"c\": [1, {}]}");
  write_gz(dir.file("a.jsonl.gz"), read_file(jsonl));
  write_gz(dir.file("a.json.gz"), read_file(arr));
  EXPECT_EQ(read_all(dir.file("a.jsonl.gz")).size(), 2u);
  auto g = read_all(dir.file("a.json.gz"));
  ASSERT_EQ(g.size(), 2u);
  EXPECT_EQ(g[1].second, r[1].second);
  EXPECT_EQ(open_records(dir.file("a.json.gz"))->kind(), FileKind::kJsonArray);
  // A minified array on one line, and an empty one.
  EXPECT_EQ(read_all(dir.write("m.json", "[{\"a\":1},{\"a\":2},{\"a\":3}]")).size(), 3u);
  EXPECT_EQ(read_all(dir.write("e.json", " [ ] ")).size(), 0u);
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Readers, FileLevelProblemsAreOneErrorNamingTheFile) {
  test::TempDir dir;
  auto msg = [&](const std::string& name, const std::string& content) {
    std::string p = dir.write(name, content);
    return error_of([&] { read_all(p); });
  };
  EXPECT_NE(msg("c.json", "[{\"a\":1} {\"a\":2}]").find("c.json:1: not a valid JSON array: expected ',' or ']' after record 1, got '{'"),
            std::string::npos);
  EXPECT_NE(msg("t.json", "[{\"a\":1},\n]").find("t.json:2: not a valid JSON array: expected a record after ','"),
            std::string::npos);
  EXPECT_NE(msg("g.json", "[{\"a\":1}] x").find("expected nothing after the JSON array's closing ']'"), std::string::npos);
  EXPECT_NE(msg("s.json", "[{\"a\":1},\n{\"a\":\"unterminated}]").find("s.json: the file ends inside record 2 (which starts at line 2)"),
            std::string::npos);
  EXPECT_NE(msg("n.json", "[{\"a\":1},").find("ends before the JSON array's closing ']'"), std::string::npos);
  EXPECT_NE(msg("x.csv", "prompt,completion\na,b\n").find("x.csv: not JSON (the first character is 'p')"), std::string::npos);
  EXPECT_NE(error_of([&] { open_records(dir.file("missing.jsonl")); }).find("cannot open " + dir.file("missing.jsonl")),
            std::string::npos);
  // A truncated .gz: once, naming the file.
  write_gz(dir.file("full.jsonl.gz"), std::string(200000, ' ') + "{\"text\":\"x\"}\n");
  std::string gz = read_file(dir.file("full.jsonl.gz"));
  std::string cut = dir.write("cut.jsonl.gz", gz.substr(0, gz.size() / 2));
  EXPECT_NE(error_of([&] { read_all(cut); }).find(cut + " (gzip): the file is truncated"), std::string::npos);
}

struct Fixture {
  test::TempDir dir;
  std::string tok;
  Fixture() {
    tasks::write_byte_tokenizer(dir.file("tok"));
    tok = dir.file("tok");
  }
  PrepareOptions options(const std::string& input, Format f = Format::kSft) const {
    PrepareOptions o;
    o.format = f;
    o.sources = {{input, 1.0}};
    o.tokenizer_path = tok;
    o.chat_template = "chatml";
    o.max_seq_len = 256;
    o.packing = false;
    o.quiet = true;
    o.block_lines = 7;  // several blocks
    return o;
  }
};

// Each document's ids, in order.
std::vector<std::vector<uint32_t>> docs_of(const std::string& dir) {
  auto set = PreparedSet::open(dir);
  std::vector<std::vector<uint32_t>> out;
  for (int64_t i = 0; i < set.num_docs(); ++i) {
    auto v = set.doc(i);
    out.emplace_back(v.ids.data, v.ids.data + v.ids.size);
  }
  return out;
}

std::vector<std::string> sample_records(int n) {
  std::vector<std::string> out;
  for (int i = 0; i < n; ++i) {
    switch (i % 3) {
      case 0: out.push_back(R"({"instruction":"add )" + std::to_string(i) + R"(","input":"1","output":"ok"})"); break;
      case 1:
        out.push_back(R"({"conversations":[{"from":"human","value":"hi )" + std::to_string(i) +
                      R"("},{"from":"gpt","value":"yo"}]})");
        break;
      default: out.push_back(R"({"prompt":"p)" + std::to_string(i) + R"(","completion":"c"})");
    }
  }
  return out;
}

TEST(Readers, EveryFileFormatPreparesTheSameDocuments) {
  Fixture fx;
  auto recs = sample_records(30);
  std::string jsonl, arr = "[\n";
  for (size_t i = 0; i < recs.size(); ++i) {
    jsonl += recs[i] + "\n";
    arr += "  " + recs[i] + (i + 1 < recs.size() ? ",\n" : "\n");
  }
  arr += "]\n";
  const std::string a = fx.dir.write("d.jsonl", jsonl), b = fx.dir.write("d.json", arr);
  write_gz(fx.dir.file("d.jsonl.gz"), jsonl);
  write_gz(fx.dir.file("d.json.gz"), arr);
  auto ref = prepare(fx.options(a), fx.dir.file("o0"));
  EXPECT_EQ(ref.summary.docs, 30);
  const auto want = docs_of(fx.dir.file("o0"));
  int k = 1;
  for (const std::string& in : {b, fx.dir.file("d.jsonl.gz"), fx.dir.file("d.json.gz")}) {
    const std::string out = fx.dir.file("o" + std::to_string(k++));
    prepare(fx.options(in), out);
    EXPECT_EQ(docs_of(out), want) << in;
  }
}

TEST(Readers, EvalSplitIsADeterministicPartitionTheSameInEveryFormat) {
  Fixture fx;
  auto recs = sample_records(200);
  std::string jsonl, arr = "[";
  for (size_t i = 0; i < recs.size(); ++i) {
    jsonl += recs[i] + "\n";
    arr += (i ? ",\n" : "") + recs[i];
  }
  arr += "]";
  const std::string a = fx.dir.write("d.jsonl", jsonl), b = fx.dir.write("d.json", arr);
  auto split = [&](const std::string& in, PrepareOptions::Split side, const std::string& out) {
    auto o = fx.options(in);
    o.split = side;
    o.eval_split = 0.25;
    auto r = prepare(o, fx.dir.file(out));
    return std::make_pair(r.summary, docs_of(fx.dir.file(out)));
  };
  auto [ts, train] = split(a, PrepareOptions::Split::kTrain, "train");
  auto [es, eval] = split(a, PrepareOptions::Split::kEval, "eval");
  auto all = docs_of(prepare(fx.options(a), fx.dir.file("all")).dir);
  EXPECT_EQ(ts.docs + es.docs, 200);
  EXPECT_EQ(ts.other_split, es.docs);
  EXPECT_EQ(es.other_split, ts.docs);
  EXPECT_GT(es.docs, 25);  // ~50 expected of 200 at 0.25
  EXPECT_LT(es.docs, 80);
  std::multiset<std::vector<uint32_t>> u(train.begin(), train.end()), want(all.begin(), all.end());
  u.insert(eval.begin(), eval.end());
  EXPECT_EQ(u, want);  // a partition of the records
  // Deterministic, and the same side for the same record from a JSON array.
  EXPECT_EQ(split(a, PrepareOptions::Split::kEval, "eval2").second, eval);
  EXPECT_EQ(split(b, PrepareOptions::Split::kEval, "eval3").second, eval);
  EXPECT_EQ(split(b, PrepareOptions::Split::kTrain, "train3").second, train);
  // Bad records are reported by the train side only.
  const std::string bad = fx.dir.write("bad.jsonl", jsonl + "{\"id\": 1}\n");
  auto o = fx.options(bad);
  o.split = PrepareOptions::Split::kEval;
  o.eval_split = 0.25;
  EXPECT_NO_THROW(prepare(o, fx.dir.file("eval4")));
  o.split = PrepareOptions::Split::kTrain;
  EXPECT_NE(error_of([&] { prepare(o, fx.dir.file("train4")); }).find(bad + ":201: no \"messages\""), std::string::npos);
}

TEST(Readers, EvalSplitFromTheRecipe) {
  config::DataSection d;
  config::set_defaults(d);
  d.train = {{"t.jsonl", 1.0}};
  config::TokenizerSection t;
  config::set_defaults(t);
  t.path = "tok";
  config::ModelSection m;
  config::set_defaults(m);
  EXPECT_FALSE(has_eval_data(d));
  d.eval_split = 0.1;
  d.columns = {{"prompt", "question"}};
  EXPECT_TRUE(has_eval_data(d));
  auto tr = prepare_options_from_recipe(d, t, m, 1, Format::kSft, false);
  auto ev = prepare_options_from_recipe(d, t, m, 1, Format::kSft, true);
  EXPECT_EQ(tr.split, PrepareOptions::Split::kTrain);
  EXPECT_EQ(ev.split, PrepareOptions::Split::kEval);
  EXPECT_EQ(ev.sources[0].path, "t.jsonl");
  EXPECT_EQ(ev.columns, (std::vector<std::pair<std::string, std::string>>{{"prompt", "question"}}));
  config::Errors e;
  d.eval = {{"e.jsonl", 1.0}};
  d.eval_split = 1.5;
  d.columns = {{"promt", "q"}, {"completion", "q"}};
  d.validate(e);
  std::string all;
  for (auto& s : e.items) all += s + "\n";
  EXPECT_NE(all.find("data.columns.promt: \"promt\" is not a field ptk reads"), std::string::npos) << all;
  EXPECT_NE(all.find("data.columns.completion and data.columns.promt both take column \"q\""), std::string::npos) << all;
  EXPECT_NE(all.find("data.eval_split must be a fraction in [0, 1)"), std::string::npos) << all;
  e.items.clear();
  d.eval_split = 0.2;
  d.columns.clear();
  d.validate(e);
  ASSERT_EQ(e.items.size(), 1u);
  EXPECT_NE(e.items[0].find("data.eval_split (0.200000) and data.eval are exclusive"), std::string::npos);
}

TEST(Readers, ABrokenJsonArrayOrAWrongFormatIsOneError) {
  Fixture fx;
  // A syntax error inside a record of a JSON array: the file is not JSON, whatever data.on_error says.
  const std::string arr = fx.dir.write("bad.json", "[\n{\"text\":\"a\"},\n{\"text\" \"b\"},\n{\"text\":\"c\"}\n]\n");
  auto o = fx.options(arr);
  o.on_error = "skip";
  std::string e = error_of([&] { prepare(o, fx.dir.file("o")); });
  EXPECT_NE(e.find(arr + ":record 2 (line 3): invalid JSON at column 9"), std::string::npos) << e;
  EXPECT_NE(e.find("a JSON array file must be valid JSON as a whole"), std::string::npos) << e;
  // Every record refused for one reason (the wrong format): one line naming the file, not 40.
  std::string lines;
  for (int i = 0; i < 40; ++i) lines += R"({"question":"q","answer":"a"})" "\n";
  const std::string wrong = fx.dir.write("gsm.jsonl", lines);
  o = fx.options(wrong);
  o.block_lines = 8192;
  e = error_of([&] { prepare(o, fx.dir.file("o")); });
  EXPECT_EQ(e.find("gsm.jsonl:2"), std::string::npos) << e;
  EXPECT_NE(e.find(wrong + ": all 40 records read (from " + wrong + ":1) are refused: no \"messages\""), std::string::npos) << e;
  EXPECT_NE(e.find("data.columns="), std::string::npos) << e;
  // With the mapping they are read.
  o.columns = {{"prompt", "question"}, {"completion", "answer"}};
  EXPECT_EQ(prepare(o, fx.dir.file("o")).summary.docs, 40);
}

}  // namespace
}  // namespace ptk::data
