// prepare's output bytes pinned: fixed inputs in every format (sft messages / prompt-completion /
// text, preference, rl; bad lines skipped, truncation, mixing weights, several shards and blocks) go
// through prepare, and the SHA-256 of every file it writes must equal the value recorded with the
// prepare of commit 03458f0 (before the throughput work of issue 8; Qwen's sft case re-recorded
// when prompt/completion masks on lines NFC changes were fixed, both sft cases for kPrepareVersion 3:
// TRL's conversational completion masks and bfd tie-breaking; every case for kPrepareVersion 4:
// plain prompt/completion tokenized apart, the manifest's boundary_merged count; the sft cases for
// kPrepareVersion 5, chat templates rendered by the Jinja interpreter: tokens, masks and rows
// unchanged, only the bad role's reason in skipped.txt, which now lists "tool", and so the
// manifest's file sizes). With the byte-level tokenizer
// always; with Qwen's tokenizer.json (real merges, NFC, CJK, long words) when it is present.
// The hashes are a regression pin of ptk's own output, not a reference: they say the bytes did not
// change, not that they were right. A change to any output byte fails here: if one is intended,
// bump kPrepareVersion and re-record.
//
// What the pin holds is checked independently by the *MatchesHfReference tests: the same inputs
// through prepare, then tests/datasets/prepare_reference_check.py (the venv's Python) reads the
// folder with its own reader of the layout in datasets/shards.h and rebuilds every document from
// the JSONL with Hugging Face tokenizers and transformers' chat templates: token ids, loss masks,
// prompt/chosen segment lengths, truncation, skipped lines, mixing-weight copies, shard layout,
// best-fit-decreasing packing and the manifest's counts.
#include <gtest/gtest.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <filesystem>
#include <map>
#include <string>

#include "core/util/fs.h"
#include "core/util/json.h"
#include "datasets/byte_tokenizer.h"
#include "datasets/prepare.h"
#include "tests/support/test_util.h"

namespace ptk::data {
namespace {

namespace fs = std::filesystem;

// A fixed pseudo-random sequence (not std:: distributions, whose output may change between libraries).
struct Lcg {
  uint64_t s;
  uint32_t next() {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<uint32_t>(s >> 33);
  }
  size_t pick(size_t n) { return next() % n; }
};

// JSON string literal of `s` (quotes and escapes).
std::string q(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

const char* const kPieces[] = {
    "Hello, world!",
    "  two  spaces and a tab\there",
    "\nleading newline",
    "trailing newline\n",
    "中文的句子，没有空格也可以分词。",
    "日本語のテキストとカタカナ",
    "emoji 🎉🚀 and symbols ©®™",
    "e\xCC\x81 composed by NFC (e + U+0301), Cafe\xCC\x81",
    "numbers 1234567890 3.14159 -42",
    "code: for (int i = 0; i < n; ++i) { x += y[i]; }",
    "supercalifragilisticexpialidocious_supercalifragilisticexpialidocious_and_more_letters",
    "很长的中文词语没有任何标点符号所以整个一段都是一个预分词单元超过六十四个字节的长度",
    "<|im_start|> inside content <|im_end|> stays text?",
    "Ünïcödé àccents",
    "",
};

std::string piece(Lcg& r) {
  std::string s;
  int n = 1 + static_cast<int>(r.pick(3));
  for (int i = 0; i < n; ++i) s += kPieces[r.pick(sizeof(kPieces) / sizeof(kPieces[0]))];
  return s.empty() ? "x" : s;
}

std::string message(const char* role, const std::string& content) {
  return std::string("{\"role\":\"") + role + "\",\"content\":" + q(content) + "}";
}

// sft lines of every kind, some bad, some long.
std::string sft_lines(uint64_t seed, int n) {
  Lcg r{seed};
  std::string out;
  for (int i = 0; i < n; ++i) {
    switch (i % 7) {
      case 0:
      case 1: {  // messages, optional system, 1-3 exchanges
        std::string m = "[";
        if (r.pick(2)) m += message("system", piece(r)) + ",";
        int turns = 1 + static_cast<int>(r.pick(3));
        for (int t = 0; t < turns; ++t) m += message("user", piece(r)) + "," + message("assistant", piece(r)) + (t + 1 < turns ? "," : "");
        out += "{\"messages\":" + m + "]}\n";
        break;
      }
      case 2: out += "{\"prompt\":" + q(piece(r)) + ",\"completion\":" + q(piece(r)) + "}\n"; break;
      case 3:
        out += "{\"prompt\":[" + message("user", piece(r)) + "],\"completion\":[" + message("assistant", piece(r)) + "]}\n";
        break;
      case 4: out += "{\"text\":" + q(piece(r)) + "}\n"; break;
      case 5: {  // long: truncated at max_seq_len
        std::string c;
        for (int k = 0; k < 12; ++k) c += piece(r);
        out += "{\"messages\":[" + message("user", piece(r)) + "," + message("assistant", c) + "]}\n";
        break;
      }
      case 6:
        if (i % 21 == 6) {
          out += "{\"messages\":[{\"role\":\"bot\",\"content\":\"x\"}]}\n";  // bad: skipped
        } else if (i % 21 == 13) {
          out += "\n";  // blank: not counted
        } else {
          out += "{\"messages\":[" + message("user", piece(r)) + "," + message("assistant", piece(r)) + "]}\n";
        }
        break;
    }
  }
  return out;
}

std::string preference_lines(uint64_t seed, int n) {
  Lcg r{seed};
  std::string out;
  for (int i = 0; i < n; ++i) {
    if (i % 2 == 0) {
      out += "{\"prompt\":" + q(piece(r)) + ",\"chosen\":" + q(piece(r) + piece(r)) + ",\"rejected\":" + q(piece(r)) + "}\n";
    } else {
      out += "{\"prompt\":[" + message("system", piece(r)) + "," + message("user", piece(r)) + "],\"chosen\":[" +
             message("assistant", piece(r)) + "],\"rejected\":[" + message("assistant", piece(r) + piece(r) + piece(r)) +
             "]}\n";
    }
  }
  return out;
}

std::string rl_lines(uint64_t seed, int n) {
  Lcg r{seed};
  std::string out;
  for (int i = 0; i < n; ++i) {
    std::string prompt = i % 2 ? "[" + message("user", piece(r)) + "]" : q(piece(r));
    std::string answer = i % 3 ? std::to_string(r.pick(1000)) : q(piece(r));
    out += "{\"prompt\":" + prompt + ",\"answer\":" + answer + ",\"id\":" + std::to_string(i) + ",\"tags\":[\"a\",1]}\n";
  }
  return out;
}

// SHA-256 per output file; the manifest as its path-free parts (counts, tokens, shards, files), and
// skipped.txt with the input folder (a temporary path) replaced by "<in>".
std::map<std::string, std::string> digest(const std::string& dir, const std::string& input_dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    std::string name = e.path().filename().string();
    if (name == "manifest.json") {
      auto m = json::parse_file(e.path().string());
      std::string s = json::to_string(m["counts"]) + json::to_string(m["tokens"]) + json::to_string(m["shards"]) +
                      json::to_string(m["files"]);
      out[name] = sha256_hex(s.data(), s.size());
    } else if (name == "skipped.txt") {
      std::string s = read_file(e.path().string());
      for (size_t p = s.find(input_dir); p != std::string::npos; p = s.find(input_dir, p)) s.replace(p, input_dir.size(), "<in>");
      out[name] = sha256_hex(s.data(), s.size());
    } else {
      out[name] = sha256_file(e.path().string());
    }
  }
  return out;
}

// One hash over the per-file hashes, and the per-file list for the failure message.
std::string combined(const std::map<std::string, std::string>& d, std::string* listing) {
  std::string all;
  for (const auto& [name, h] : d) all += name + ":" + h + "\n";
  *listing = all;
  return sha256_hex(all.data(), all.size());
}

struct Case {
  const char* name;
  Format format;
  std::string text;
  double weight;
  int64_t max_seq_len;
  const char* expected;  // combined hash recorded with commit 03458f0's prepare (see the top)
};

// Prepares case `c` into dir/out-<name> from two sources: its lines at c.weight, and a prefix of
// them (cut mid-line: the last line is bad) at a fractional weight.
PrepareOptions prepare_case(const Case& c, const std::string& tokenizer, const char* chat_template,
                            const test::TempDir& dir, std::string* out) {
  std::string in = dir.write(std::string(c.name) + ".jsonl", c.text);
  std::string in2 = dir.write(std::string(c.name) + "-b.jsonl", c.text.substr(0, c.text.size() / 3 / 2 * 2));
  PrepareOptions o;
  o.format = c.format;
  o.sources = {{in, c.weight}, {in2, 0.5}};
  o.tokenizer_path = tokenizer;
  o.chat_template = chat_template;
  o.max_seq_len = c.max_seq_len;
  o.on_error = "skip";
  o.seed = 7;
  o.threads = 3;
  o.block_lines = 13;       // many blocks
  o.shard_tokens = 30000;   // several shards
  o.quiet = true;
  *out = dir.file(std::string("out-") + c.name);
  prepare(o, *out);
  return o;
}

void run_cases(const std::string& tokenizer, const char* chat_template, const std::vector<Case>& cases,
               const test::TempDir& dir) {
  for (const auto& c : cases) {
    std::string out;
    prepare_case(c, tokenizer, chat_template, dir, &out);
    std::string listing;
    EXPECT_EQ(combined(digest(out, dir.path()), &listing), c.expected) << c.name << ": output bytes changed; files:\n" << listing;
  }
}

// Prepares `cases` and has prepare_reference_check.py rebuild every file's content independently
// (see the top of this file); `template_file` is the Jinja source of the template ptk renders.
void check_against_reference(const std::string& py, const std::string& tokenizer, const char* chat_template,
                             const std::string& template_file, const std::vector<Case>& cases, bool merges) {
  test::TempDir dir;
  rapidjson::StringBuffer buf;
  rapidjson::Writer<rapidjson::StringBuffer> w(buf);
  w.StartObject();
  w.Key("cases");
  w.StartArray();
  for (const auto& c : cases) {
    std::string out;
    PrepareOptions o = prepare_case(c, tokenizer, chat_template, dir, &out);
    w.StartObject();
    w.Key("name"), w.String(c.name);
    w.Key("dir"), w.String(out.c_str());
    w.Key("format"), w.String(format_name(o.format));
    w.Key("tokenizer"), w.String(tokenizer.c_str());
    w.Key("chat_template"), w.String(template_file.c_str());
    w.Key("max_seq_len"), w.Int64(o.max_seq_len);
    w.Key("packing"), w.Bool(o.packing);
    w.Key("seed"), w.Uint64(o.seed);
    w.Key("shard_tokens"), w.Uint64(o.shard_tokens);
    w.Key("sources"), w.StartArray();
    for (const auto& src : o.sources) {
      w.StartObject();
      w.Key("path"), w.String(src.path.c_str());
      w.Key("weight"), w.Double(src.weight);
      w.EndObject();
    }
    w.EndArray();
    w.EndObject();
  }
  w.EndArray();
  w.EndObject();
  std::string spec = dir.write("spec.json", std::string(buf.GetString(), buf.GetSize()));
  auto r = test::run(py + " " + test::source_dir() + "/tests/datasets/prepare_reference_check.py " + spec + " " +
                     dir.file("result.json"));
  EXPECT_EQ(r.exit_code, 0) << r.out;
  auto res = json::parse_file(dir.file("result.json"));
  for (const auto& c : cases) {
    ASSERT_TRUE(res.HasMember(c.name)) << r.out;
    const auto& x = res[c.name];
    ASSERT_TRUE(x.HasMember("docs")) << r.out;
    // The check covered real content: documents, bad lines and (where the inputs make them) cuts.
    EXPECT_GT(x["docs"].GetInt64(), 100) << c.name;
    EXPECT_GT(x["skipped"].GetInt64(), 0) << c.name;
    EXPECT_GT(x["rows"].GetInt64(), 0) << c.name;
    if (c.format != Format::kRl) {
      EXPECT_GT(x["truncated"].GetInt64(), 0) << c.name;
    }
    // Plain prompt/completion pairs whose one-text encoding merges across the boundary (counted by
    // both sides): Qwen's merges make some; the byte-level tokenizer has none.
    if (merges && c.format != Format::kRl) {
      EXPECT_GT(x["boundary_merged"].GetInt64(), 0) << c.name;
    } else {
      EXPECT_EQ(x["boundary_merged"].GetInt64(), 0) << c.name;
    }
  }
}

std::vector<Case> byte_cases() {
  return {
      {"sft", Format::kSft, sft_lines(1, 400), 2.0, 256, "58db19ce8fcfaa03fa5916f4def59481ec39fc3345747cefcdb8f0ae5922c532"},
      {"preference", Format::kPreference, preference_lines(2, 200), 1.0, 200, "96cdf1474f51368400662a23916aeb7d5c88ca028d53e13bc9729766de211815"},
      {"rl", Format::kRl, rl_lines(3, 200), 1.0, 120, "671ab06d4cb6517a82f0a64ed07dddd2b5875e623bd4e4cc06d88cf2c06707ca"},
  };
}

std::vector<Case> qwen_cases() {
  return {
      {"sft", Format::kSft, sft_lines(11, 600), 1.0, 128, "5c378753626b4f39b1cfd89dbb7288287c3bdaa4226acad4e082586be614b1be"},
      {"preference", Format::kPreference, preference_lines(12, 200), 1.0, 96, "bffbd29cf5e2372dfacee9241e6c78d26c6c6838bee4e1d4a1ab85eb8b2e3add"},
      {"rl", Format::kRl, rl_lines(13, 200), 1.0, 64, "5eec4b4c2f774f3503255182c29680b34f24897c45fbb932c8ebc03597f43552"},
  };
}

std::string template_file(const char* name) {
  return test::source_dir() + "/tests/tokenizer/data/" + name + "_chat_template.jinja";
}

TEST(PrepareGolden, ByteTokenizerBytesUnchanged) {
  test::TempDir dir;
  tasks::write_byte_tokenizer(dir.file("tok"));
  run_cases(dir.file("tok"), "chatml", byte_cases(), dir);
}

TEST(PrepareGolden, QwenTokenizerBytesUnchanged) {
  std::string tok = test::source_dir() + "/assets/tokenizers/qwen";
  if (!path_exists(tok + "/tokenizer.json"))
    PTK_SKIP_WITHOUT("qwen-tokenizer") << "Qwen tokenizer.json not found in assets/tokenizers/qwen: run scripts/setup.sh";
  test::TempDir dir;
  run_cases(tok, "qwen2.5", qwen_cases(), dir);
}

TEST(PrepareGolden, ByteTokenizerMatchesHfReference) {
  std::string py = test::reference_python();
  if (py.empty()) PTK_SKIP_WITHOUT("venv") << "no .venv python with HF tokenizers and transformers: independent check skipped";
  test::TempDir dir;
  tasks::write_byte_tokenizer(dir.file("tok"));
  check_against_reference(py, dir.file("tok"), "chatml", template_file("chatml"), byte_cases(), false);
}

TEST(PrepareGolden, QwenTokenizerMatchesHfReference) {
  std::string tok = test::source_dir() + "/assets/tokenizers/qwen";
  if (!path_exists(tok + "/tokenizer.json"))
    PTK_SKIP_WITHOUT("qwen-tokenizer") << "Qwen tokenizer.json not found in assets/tokenizers/qwen: run scripts/setup.sh";
  std::string py = test::reference_python();
  if (py.empty()) PTK_SKIP_WITHOUT("venv") << "no .venv python with HF tokenizers and transformers: independent check skipped";
  check_against_reference(py, tok, "qwen2.5", template_file("qwen2.5"), qwen_cases(), true);
}

}  // namespace
}  // namespace ptk::data
