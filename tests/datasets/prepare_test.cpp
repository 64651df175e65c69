// prepare with the byte-level tokenizer (id == byte, so expected ids are written by hand): masks per
// format, truncation and drops counted, on_error fail/skip, weights, identical bytes twice (any thread
// count), reuse and staleness, and crash safety (no manifest -> not a prepared folder).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <map>
#include <string>

#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "datasets/byte_tokenizer.h"
#include "datasets/loader.h"
#include "datasets/prepare.h"
#include "tests/support/test_util.h"

namespace ptk::data {
namespace {

namespace fs = std::filesystem;

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
    o.max_seq_len = 64;
    o.quiet = true;
    return o;
  }
};

std::vector<uint32_t> bytes_of(const std::string& s) { return std::vector<uint32_t>(s.begin(), s.end()); }

// Every regular file of a folder, name -> bytes.
std::map<std::string, std::string> folder_bytes(const std::string& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out[e.path().filename().string()] = read_file(e.path().string());
  return out;
}

constexpr uint32_t kEnd = 256, kStart = 257, kImEnd = 258;  // <|endoftext|>, <|im_start|>, <|im_end|>

TEST(Prepare, SftMasksPerKind) {
  Fixture fx;
  std::string in = fx.dir.write("d.jsonl",
                                R"({"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]})"
                                "\n"
                                R"({"prompt":"ab","completion":"cd"})"
                                "\n"
                                R"({"text":"xyz"})"
                                "\n");
  auto o = fx.options(in);
  o.packing = false;
  auto r = prepare(o, fx.dir.file("out"));
  EXPECT_FALSE(r.reused);
  EXPECT_EQ(r.summary.read, 3);
  EXPECT_EQ(r.summary.docs, 3);
  auto set = PreparedSet::open(fx.dir.file("out"));
  ASSERT_EQ(set.num_docs(), 3);
  // Chat: "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"; loss on "yo<|im_end|>".
  std::vector<uint32_t> chat{kStart};
  for (uint32_t c : bytes_of("user\nhi")) chat.push_back(c);
  chat.push_back(kImEnd);
  chat.push_back('\n');
  chat.push_back(kStart);
  for (uint32_t c : bytes_of("assistant\nyo")) chat.push_back(c);
  chat.push_back(kImEnd);
  chat.push_back('\n');
  EXPECT_EQ(set.doc(0).ids.to_vector(), chat);
  std::vector<uint8_t> chat_mask(chat.size(), 0);
  chat_mask[chat.size() - 4] = chat_mask[chat.size() - 3] = chat_mask[chat.size() - 2] = 1;  // y o <|im_end|>
  EXPECT_EQ(set.doc(0).mask.to_vector(), chat_mask);
  // Prompt/completion: loss on the completion and the EOS (<|im_end|> for this tokenizer).
  EXPECT_EQ(set.doc(1).ids.to_vector(), (std::vector<uint32_t>{'a', 'b', 'c', 'd', kImEnd}));
  EXPECT_EQ(set.doc(1).mask.to_vector(), (std::vector<uint8_t>{0, 0, 1, 1, 1}));
  EXPECT_EQ(set.doc(1).entry->seg_a, 2u);
  // Text: every token, plus EOS.
  EXPECT_EQ(set.doc(2).ids.to_vector(), (std::vector<uint32_t>{'x', 'y', 'z', kImEnd}));
  EXPECT_EQ(set.doc(2).mask.to_vector(), (std::vector<uint8_t>{1, 1, 1, 1}));
  EXPECT_EQ(set.doc(2).entry->line, 3u);
  // Targets exclude each document's first token: 3 + 3 + 3.
  EXPECT_EQ(r.summary.targets, 9);
  EXPECT_EQ(r.summary.tokens, static_cast<int64_t>(chat.size() + 5 + 4));
  (void)kEnd;
}

// Conversational prompt/completion: TRL's completion_mask, every token after the prompt rendered with
// the generation prompt, so also the template's "\n" after the assistant's <|im_end|> (which the
// assistant mask of a "messages" record leaves out) and a non-assistant turn inside the completion.
TEST(Prepare, SftConversationalCompletionMaskIsEverythingAfterThePrompt) {
  Fixture fx;
  std::string in = fx.dir.write("d.jsonl",
                                R"({"prompt":[{"role":"user","content":"hi"}],"completion":[{"role":"assistant","content":"yo"}]})"
                                "\n"
                                R"({"prompt":[{"role":"user","content":"hi"}],"completion":[{"role":"assistant","content":"a"},)"
                                R"({"role":"user","content":"b"},{"role":"assistant","content":"c"}]})"
                                "\n");
  auto o = fx.options(in);
  o.packing = false;
  prepare(o, fx.dir.file("out"));
  auto set = PreparedSet::open(fx.dir.file("out"));
  ASSERT_EQ(set.num_docs(), 2);
  std::vector<uint32_t> prompt{kStart};  // "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  for (uint32_t c : bytes_of("user\nhi")) prompt.push_back(c);
  prompt.push_back(kImEnd);
  prompt.push_back('\n');
  prompt.push_back(kStart);
  for (uint32_t c : bytes_of("assistant\n")) prompt.push_back(c);
  auto expect = [&](int64_t doc, const std::vector<uint32_t>& completion) {
    std::vector<uint32_t> ids = prompt;
    ids.insert(ids.end(), completion.begin(), completion.end());
    std::vector<uint8_t> mask(prompt.size(), 0);
    mask.resize(ids.size(), 1);
    EXPECT_EQ(set.doc(doc).ids.to_vector(), ids);
    EXPECT_EQ(set.doc(doc).mask.to_vector(), mask);
    EXPECT_EQ(set.doc(doc).entry->seg_a, prompt.size());
  };
  expect(0, {'y', 'o', kImEnd, '\n'});
  std::vector<uint32_t> turns{'a', kImEnd, '\n', kStart};
  for (uint32_t c : bytes_of("user\nb")) turns.push_back(c);
  turns.insert(turns.end(), {kImEnd, '\n', kStart});
  for (uint32_t c : bytes_of("assistant\nc")) turns.push_back(c);
  turns.insert(turns.end(), {kImEnd, '\n'});
  expect(1, turns);
}

TEST(Prepare, TruncateOrDropCounted) {
  Fixture fx;
  std::string in = fx.dir.write("d.jsonl", R"({"text":"0123456789"})"
                                           "\n"
                                           R"({"text":"ab"})"
                                           "\n");
  auto o = fx.options(in);
  o.max_seq_len = 6;
  auto r = prepare(o, fx.dir.file("t"));
  EXPECT_EQ(r.summary.truncated, 1);
  EXPECT_EQ(r.summary.dropped, 0);
  auto set = PreparedSet::open(fx.dir.file("t"));
  EXPECT_EQ(set.doc(0).ids.to_vector(), bytes_of("012345"));
  o.overlong = "drop";
  r = prepare(o, fx.dir.file("d"));
  EXPECT_EQ(r.summary.truncated, 0);
  EXPECT_EQ(r.summary.dropped, 1);
  EXPECT_EQ(r.summary.docs, 1);
}

TEST(Prepare, OnErrorFailListsEveryBadLineAndLeavesTheOldFolder) {
  Fixture fx;
  std::string good = fx.dir.write("good.jsonl", "{\"text\":\"a\"}\n");
  std::string out = fx.dir.file("out");
  prepare(fx.options(good), out);
  std::string before = read_file(out + "/manifest.json");
  std::string bad = fx.dir.write("bad.jsonl", "{\"text\":\"a\"}\n{\"text\":1}\n\n{\"prompt\":\"p\"}\nnot json\n");
  try {
    prepare(fx.options(bad), out);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()),
              "prepare: 3 bad records (data.on_error = fail):\n"
              "  " + bad + ":2: field \"text\" must be a string, got number\n"
              "  " + bad + ":4: missing field \"completion\"\n"
              "  " + bad + ":5: invalid JSON at column 2: Invalid value.\n"
              "---> HINT: fix these lines, or set data.on_error=skip to skip and list them");
  }
  EXPECT_EQ(read_file(out + "/manifest.json"), before);  // untouched
  for (const auto& e : fs::directory_iterator(fx.dir.path()))
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();  // no leftovers
}

TEST(Prepare, OnErrorSkipCountsAndLists) {
  Fixture fx;
  std::string bad = fx.dir.write("bad.jsonl", "{\"text\":\"a\"}\n{\"text\":1}\n{\"text\":\"b\"}\n");
  auto o = fx.options(bad);
  o.on_error = "skip";
  auto r = prepare(o, fx.dir.file("out"));
  EXPECT_EQ(r.summary.read, 3);
  EXPECT_EQ(r.summary.skipped, 1);
  EXPECT_EQ(r.summary.docs, 2);
  EXPECT_EQ(read_file(fx.dir.file("out/skipped.txt")), bad + ":2: field \"text\" must be a string, got number\n");
  EXPECT_NE(summary_line(r).find("3 records read, 1 skipped, 0 truncated"), std::string::npos) << summary_line(r);
  auto m = json::parse_file(fx.dir.file("out/manifest.json"));
  EXPECT_EQ(m["counts"]["skipped"].GetInt64(), 1);
  EXPECT_EQ(m["per_source"][0]["skipped"].GetInt64(), 1);
}

// A line nested 1M levels deep (parsed on a worker thread) is a bad record named by file and line:
// listed by data.on_error=fail, skipped and listed by skip. It used to crash the process (exit 139).
TEST(Prepare, DeeplyNestedLinesAreBadRecordsWithFileAndLine) {
  Fixture fx;
  const std::string deep(1000000, '[');
  std::string in = fx.dir.write("deep.jsonl", "{\"text\":\"a\"}\n{\"text\": " + deep + std::string(1000000, ']') +
                                                  "}\n" + deep + "\n{\"text\":\"b\"}\n");
  const std::string line2 = in + ":2: invalid JSON at column 521: nested deeper than 512 levels";
  const std::string line3 = in + ":3: invalid JSON at column 513: nested deeper than 512 levels";
  try {
    prepare(fx.options(in), fx.dir.file("fail"));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "prepare: 2 bad records (data.on_error = fail):\n  " + line2 + "\n  " + line3 +
                                         "\n---> HINT: fix these lines, or set data.on_error=skip to skip and list them");
  }
  auto o = fx.options(in);
  o.on_error = "skip";
  auto r = prepare(o, fx.dir.file("skip"));
  EXPECT_EQ(r.summary.read, 4);
  EXPECT_EQ(r.summary.skipped, 2);
  EXPECT_EQ(r.summary.docs, 2);
  EXPECT_EQ(read_file(fx.dir.file("skip/skipped.txt")), line2 + "\n" + line3 + "\n");
}

// A FIFO as a data file, a tokenizer file or a prepared manifest is refused with its path before
// any open() can block (watched: a regression fails instead of hanging).
TEST(Prepare, AFifoIsRefusedNotWaitedOn) {
  Fixture fx;
  std::string fifo = test::make_fifo(fx.dir.file("train.jsonl"));
  const std::string want = "cannot open " + fifo + ": is a FIFO, not a regular file";
  EXPECT_EQ(test::error_within([&] { prepare(fx.options(fifo), fx.dir.file("out")); }, fifo), want);
  EXPECT_EQ(test::error_within([&] { is_fresh(fx.options(fifo), fx.dir.file("out")); }, fifo), want);

  std::string good = fx.dir.write("good.jsonl", "{\"text\":\"a\"}\n");
  prepare(fx.options(good), fx.dir.file("p"));
  std::string manifest = fx.dir.file("p/manifest.json");
  fs::remove(manifest);
  test::make_fifo(manifest);
  EXPECT_EQ(test::error_within([&] { PreparedSet::open(fx.dir.file("p")); }, manifest),
            "cannot open " + manifest + ": is a FIFO, not a regular file");

  std::string tok_json = fx.dir.file("tok/tokenizer.json");
  fs::remove(tok_json);
  test::make_fifo(tok_json);
  EXPECT_EQ(test::error_within([&] { prepare(fx.options(good), fx.dir.file("q")); }, tok_json),
            "cannot open " + tok_json + ": is a FIFO, not a regular file");
}

TEST(Prepare, IdenticalBytesTwiceWhateverTheThreads) {
  Fixture fx;
  std::string text;
  for (int i = 0; i < 3000; ++i)
    text += "{\"messages\":[{\"role\":\"user\",\"content\":\"q" + std::to_string(i) +
            "\"},{\"role\":\"assistant\",\"content\":\"" + std::string(i % 37 + 1, 'a' + i % 26) + "\"}]}\n";
  std::string in = fx.dir.write("d.jsonl", text);
  auto o = fx.options(in);
  o.block_lines = 500;
  o.shard_tokens = 20000;  // several shards
  o.threads = 1;
  auto a = prepare(o, fx.dir.file("a"));
  o.threads = 3;
  auto b = prepare(o, fx.dir.file("b"));
  auto fa = folder_bytes(fx.dir.file("a")), fb = folder_bytes(fx.dir.file("b"));
  EXPECT_GE(fa.count("tokens-00002.u32"), 1u);
  EXPECT_EQ(fa, fb);
  EXPECT_EQ(a.summary.rows, b.summary.rows);
  EXPECT_LT(a.summary.rows, a.summary.docs);  // packed
  auto m = json::parse_file(fx.dir.file("a/manifest.json"));
  EXPECT_EQ(m["key"]["sources"][0]["size"].GetUint64(), text.size());
  EXPECT_EQ(std::string(m["key"]["sources"][0]["sha256"].GetString()), sha256_hex(text.data(), text.size()));
  EXPECT_EQ(std::string(m["key"]["tokenizer_sha256"].GetString()).size(), 64u);
  EXPECT_EQ(m["tokens"]["written"].GetInt64(), a.summary.tokens);
}

TEST(Prepare, ReuseAndStaleness) {
  Fixture fx;
  std::string in = fx.dir.write("d.jsonl", "{\"text\":\"abc\"}\n");
  std::string out = fx.dir.file("out");
  auto o = fx.options(in);
  EXPECT_FALSE(prepare(o, out).reused);
  EXPECT_TRUE(is_fresh(o, out));
  EXPECT_TRUE(prepare(o, out).reused);
  // Rewriting the same bytes (new mtime) still reuses: freshness is by content.
  fx.dir.write("d.jsonl", "{\"text\":\"abc\"}\n");
  EXPECT_TRUE(prepare(o, out).reused);
  // Changed content, options or tokenizer: rebuilt.
  fx.dir.write("d.jsonl", "{\"text\":\"abd\"}\n");
  EXPECT_FALSE(is_fresh(o, out));
  auto r = prepare(o, out);
  EXPECT_FALSE(r.reused);
  EXPECT_EQ(PreparedSet::open(out).doc(0).ids[2], static_cast<uint32_t>('d'));
  o.max_seq_len = 32;
  EXPECT_FALSE(prepare(o, out).reused);
  EXPECT_TRUE(prepare(o, out).reused);
  o.packing = false;
  EXPECT_FALSE(prepare(o, out).reused);
  std::string cfg = read_file(fx.tok + "/tokenizer_config.json");
  write_file_atomic(fx.tok + "/tokenizer_config.json", cfg + " ");
  EXPECT_FALSE(is_fresh(o, out));
  o.force = true;
  EXPECT_FALSE(prepare(o, out).reused);
  // A folder whose files no longer match the manifest is stale, and the loader refuses it.
  write_file_atomic(out + "/docs.idx", "x");
  o.force = false;
  EXPECT_FALSE(is_fresh(o, out));
  EXPECT_THROW(PreparedSet::open(out), Error);
  EXPECT_FALSE(prepare(o, out).reused);
  EXPECT_NO_THROW(PreparedSet::open(out));
}

TEST(Prepare, InterruptedPrepareLeavesNothingThatLooksComplete) {
  Fixture fx;
  std::string in = fx.dir.write("d.jsonl", "{\"text\":\"abc\"}\n");
  std::string out = fx.dir.file("out");
  // What a prepare killed before its rename leaves: a temp folder with shards but no manifest.
  fs::create_directories(out + ".tmp-99999");
  fx.dir.write("out.tmp-99999/tokens-00000.u32", "abcd");
  // And a folder that never got its manifest (e.g. written by hand or by an older crash).
  fs::create_directories(out);
  fx.dir.write("out/tokens-00000.u32", "abcd");
  try {
    PreparedSet::open(out);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("manifest.json is missing (prepare never finished there)"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(is_fresh(fx.options(in), out));
  auto r = prepare(fx.options(in), out);
  EXPECT_FALSE(r.reused);
  EXPECT_EQ(PreparedSet::open(out).num_docs(), 1);
  EXPECT_FALSE(path_exists(out + ".old-" + std::to_string(::getpid())));
}

TEST(Prepare, KilledMidWriteKeepsThePreviousFolder) {
  // A child process runs prepare on a large input and is killed at random points; every time, the
  // output folder is either the previous complete one or a new complete one.
  Fixture fx;
  std::string big;
  for (int i = 0; i < 40000; ++i) big += "{\"text\":\"" + std::string(50 + i % 200, 'a' + i % 26) + "\"}\n";
  std::string in = fx.dir.write("big.jsonl", big);
  std::string small = fx.dir.write("small.jsonl", "{\"text\":\"abc\"}\n");
  std::string out = fx.dir.file("out");
  prepare(fx.options(small), out);
  for (int delay_ms : {5, 40, 120, 5000}) {
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      auto o = fx.options(in);
      o.max_seq_len = 256;
      o.threads = 1;
      try {
        prepare(o, out);
      } catch (...) {
      }
      ::_exit(0);
    }
    ::usleep(delay_ms * 1000);
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    auto set = PreparedSet::open(out);  // never throws: complete, old or new
    EXPECT_TRUE(set.num_docs() == 1 || set.num_docs() == 40000) << set.num_docs();
  }
}

TEST(Prepare, MixingWeights) {
  Fixture fx;
  std::string a, b;
  for (int i = 0; i < 400; ++i) a += "{\"text\":\"a" + std::to_string(i) + "\"}\n";
  for (int i = 0; i < 10; ++i) b += "{\"text\":\"b" + std::to_string(i) + "\"}\n";
  std::string pa = fx.dir.write("a.jsonl", a), pb = fx.dir.write("b.jsonl", b);
  auto o = fx.options(pa);
  o.sources = {{pa, 0.5}, {pb, 3.0}};
  o.seed = 7;
  auto r = prepare(o, fx.dir.file("w"));
  EXPECT_EQ(r.summary.read, 410);
  EXPECT_GT(r.summary.excluded, 150);
  EXPECT_LT(r.summary.excluded, 250);
  EXPECT_EQ(r.summary.docs, 400 - r.summary.excluded + 30);
  auto set = PreparedSet::open(fx.dir.file("w"));
  // Repeats point at the same tokens.
  int64_t last = set.num_docs() - 1;
  EXPECT_EQ(set.doc(last).ids.data, set.doc(last - 2).ids.data);
  // Another seed picks other records; the same seed the same ones.
  o.seed = 8;
  auto r2 = prepare(o, fx.dir.file("w2"));
  EXPECT_NE(read_file(fx.dir.file("w/docs.idx")), read_file(fx.dir.file("w2/docs.idx")));
  (void)r2;
}

TEST(Prepare, PreferencePairsStayTogether) {
  Fixture fx;
  std::string in = fx.dir.write(
      "p.jsonl",
      R"({"prompt":"Q","chosen":"good","rejected":"no"})"
      "\n"
      R"({"prompt":[{"role":"user","content":"q"}],"chosen":[{"role":"assistant","content":"A"}],"rejected":[{"role":"assistant","content":"B"}]})"
      "\n");
  auto r = prepare(fx.options(in, Format::kPreference), fx.dir.file("p"));
  EXPECT_EQ(r.summary.rows, 2);
  auto set = PreparedSet::open(fx.dir.file("p"));
  auto pairs = make_preference_batch(set, {0, 1});
  EXPECT_EQ(pairs[0].prompt.to_vector(), bytes_of("Q"));
  EXPECT_EQ(pairs[0].chosen.to_vector(), (std::vector<uint32_t>{'g', 'o', 'o', 'd', kImEnd}));
  EXPECT_EQ(pairs[0].rejected.to_vector(), (std::vector<uint32_t>{'n', 'o', kImEnd}));
  // Chat: prompt with the generation prompt; replies are what the full render adds after it.
  std::vector<uint32_t> prompt{kStart};
  for (uint32_t c : bytes_of("user\nq")) prompt.push_back(c);
  prompt.push_back(kImEnd);
  prompt.push_back('\n');
  prompt.push_back(kStart);
  for (uint32_t c : bytes_of("assistant\n")) prompt.push_back(c);
  EXPECT_EQ(pairs[1].prompt.to_vector(), prompt);
  EXPECT_EQ(pairs[1].chosen.to_vector(), (std::vector<uint32_t>{'A', kImEnd, '\n'}));
  EXPECT_EQ(pairs[1].rejected.to_vector(), (std::vector<uint32_t>{'B', kImEnd, '\n'}));
  EXPECT_EQ(pairs[1].line, 2u);
  EXPECT_THROW(make_sft_batch(set, {0}, 0), Error);
}

TEST(Prepare, PreferenceTruncationKeepsPromptEnd) {
  Fixture fx;
  std::string in = fx.dir.write("p.jsonl", R"({"prompt":"0123456789","chosen":"abcdefgh","rejected":"xy"})" "\n");
  auto o = fx.options(in, Format::kPreference);
  o.max_seq_len = 10;
  auto r = prepare(o, fx.dir.file("p"));
  EXPECT_EQ(r.summary.truncated, 1);
  auto set = PreparedSet::open(fx.dir.file("p"));
  auto p = make_preference_batch(set, {0})[0];
  EXPECT_EQ(p.prompt.to_vector(), bytes_of("56789"));                        // half of 10, from the end
  EXPECT_EQ(p.chosen.to_vector(), bytes_of("abcde"));                        // the rest
  EXPECT_EQ(p.rejected.to_vector(), (std::vector<uint32_t>{'x', 'y', kImEnd}));
}

TEST(Prepare, RlPromptsKeepAnswersAndExtraFields) {
  Fixture fx;
  std::string in = fx.dir.write("r.jsonl", R"({"prompt":"1+1?","answer":"2","level":"easy"})"
                                           "\n"
                                           R"({"prompt":[{"role":"user","content":"2+2?"}],"answer":4})"
                                           "\n"
                                           R"({"prompt":")" + std::string(100, 'x') + R"(","answer":"0"})" "\n");
  auto r = prepare(fx.options(in, Format::kRl), fx.dir.file("r"));
  EXPECT_EQ(r.summary.dropped, 1);  // a prompt over max_seq_len is never cut
  auto set = PreparedSet::open(fx.dir.file("r"));
  auto b = make_rl_batch(set, {0, 1});
  EXPECT_EQ(b[0].ids.to_vector(), bytes_of("1+1?"));
  EXPECT_EQ(b[0].answer, "2");
  EXPECT_EQ(b[0].record_json, R"({"prompt":"1+1?","answer":"2","level":"easy"})");
  EXPECT_EQ(b[1].answer, "4");
  EXPECT_EQ(b[1].ids.to_vector().back(), static_cast<uint32_t>('\n'));  // ends with "<|im_start|>assistant\n"
}

TEST(Prepare, NoUsableRecordIsAnError) {
  Fixture fx;
  std::string in = fx.dir.write("e.jsonl", "\n\n");
  try {
    prepare(fx.options(in), fx.dir.file("o"));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no usable record in data.train (0 read"), std::string::npos) << e.what();
  }
}

// The byte-level tokenizer with one merge, "a" "b" -> "ab": it has no pre-tokenizer split, so "xa" +
// "by" is 'x' 'ab' 'y' as one text and 'x' 'a' | 'b' 'y' apart. "ab" takes id 256 and the special
// tokens move up one (HF numbers added tokens after the model's vocabulary): <|im_end|> is 259.
constexpr uint32_t kAb = 256, kMergingEos = 259;
std::string write_merging_tokenizer(const test::TempDir& dir) {
  tasks::write_byte_tokenizer(dir.file("mtok"));
  auto edit = [](std::string* s, const std::string& from, const std::string& to) {
    size_t at = s->find(from);
    ASSERT_NE(at, std::string::npos) << from;
    s->replace(at, from.size(), to);
  };
  std::string json = read_file(dir.file("mtok/tokenizer.json")), cfg = read_file(dir.file("mtok/tokenizer_config.json"));
  edit(&json, "\"merges\": []", "\"merges\": [\"a b\"]");
  edit(&json, "\"\xC3\xBF\": 255", "\"\xC3\xBF\": 255,\n      \"ab\": 256");  // after byte 255's character
  for (const char* id : {"258", "257", "256"}) {
    edit(&json, std::string("\"id\": ") + id, "\"id\": " + std::to_string(std::stoi(id) + 1));
    edit(&cfg, std::string("\"") + id + "\":", "\"" + std::to_string(std::stoi(id) + 1) + "\":");
  }
  write_file_atomic(dir.file("mtok/tokenizer.json"), json);
  write_file_atomic(dir.file("mtok/tokenizer_config.json"), cfg);
  return dir.file("mtok");
}

// Plain prompt/completion is tokenized apart (kPrepareVersion 4): the completion's first character
// is trained even where one text would merge it into the prompt's last token; such records are
// counted (summary, summary_line, manifest with positions, the note of prepare_warnings).
TEST(Prepare, PromptCompletionTokenizedApartAndBoundaryMergesCounted) {
  Fixture fx;
  fx.tok = write_merging_tokenizer(fx.dir);
  std::string in = fx.dir.write("d.jsonl", R"({"prompt":"xa","completion":"by"})"
                                           "\n"
                                           R"({"prompt":"xy","completion":"ab"})"
                                           "\n"
                                           R"({"text":"xaby"})"
                                           "\n");
  auto o = fx.options(in);
  o.packing = false;
  auto r = prepare(o, fx.dir.file("out"));
  auto set = PreparedSet::open(fx.dir.file("out"));
  ASSERT_EQ(set.num_docs(), 3);
  // Apart: 'x' 'a' | 'b' 'y' EOS, loss on 'b' 'y' EOS (one text was 'x' 'ab' 'y': 'b' never trained).
  EXPECT_EQ(set.doc(0).ids.to_vector(), (std::vector<uint32_t>{'x', 'a', 'b', 'y', kMergingEos}));
  EXPECT_EQ(set.doc(0).mask.to_vector(), (std::vector<uint8_t>{0, 0, 1, 1, 1}));
  EXPECT_EQ(set.doc(0).entry->seg_a, 2u);
  // No merge across this boundary; the merge inside the completion stays.
  EXPECT_EQ(set.doc(1).ids.to_vector(), (std::vector<uint32_t>{'x', 'y', kAb, kMergingEos}));
  EXPECT_EQ(set.doc(1).mask.to_vector(), (std::vector<uint8_t>{0, 0, 1, 1}));
  EXPECT_EQ(set.doc(2).ids.to_vector(), (std::vector<uint32_t>{'x', kAb, 'y', kMergingEos}));  // text: one text, as TRL
  EXPECT_EQ(r.summary.boundary_merged, 1);
  EXPECT_NE(summary_line(r).find("; 1 boundary merge avoided (prompt and completion tokenized apart)"), std::string::npos)
      << summary_line(r);
  EXPECT_EQ(r.merged_at, std::vector<std::string>{in + ":1"});
  auto m = json::parse_file(fx.dir.file("out/manifest.json"));
  EXPECT_EQ(m["counts"]["boundary_merged"].GetInt64(), 1);
  EXPECT_EQ(json::to_string(m["examples"]["boundary_merged"]), "[\"" + in + ":1\"]");
  EXPECT_EQ(std::string(m["tokenizer_path"].GetString()), fx.tok);
  auto w = prepare_warnings(o, r);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_EQ(w[0].rfind("prepare: note: 1 of 3 records (33.3%) would merge tokens across the prompt/completion boundary "
                       "if encoded as one text (e.g. " + in + ":1); ptk encodes prompt and completion apart", 0), 0u)
      << w[0];
  // Reused: the same count and positions, from the manifest.
  auto again = prepare(o, fx.dir.file("out"));
  EXPECT_TRUE(again.reused);
  EXPECT_EQ(again.summary.boundary_merged, 1);
  EXPECT_EQ(again.merged_at, r.merged_at);
  // Preference pairs (tokenized apart already) are counted the same way.
  std::string pairs = fx.dir.write("p.jsonl", R"({"prompt":"xa","chosen":"by","rejected":"zz"})"
                                              "\n"
                                              R"({"prompt":"xa","chosen":"zz","rejected":"zz"})"
                                              "\n");
  auto pr = prepare(fx.options(pairs, Format::kPreference), fx.dir.file("pairs"));
  EXPECT_EQ(pr.summary.boundary_merged, 1);
  EXPECT_EQ(pr.merged_at, std::vector<std::string>{pairs + ":1"});
}

// Truncation above kWarnTruncatedFraction of the records and any drop warn, naming the counts, the
// key and the first positions; below the threshold, nothing.
TEST(Prepare, WarningsAboveThresholds) {
  PrepareOptions o;
  o.max_seq_len = 512;
  PrepareResult r;
  r.summary.read = 22;
  r.summary.skipped = 1;
  r.summary.excluded = 1;  // 20 records tokenized
  r.summary.truncated = 1;  // 5%: not above
  r.truncated_at = {"d.jsonl:4"};
  EXPECT_TRUE(prepare_warnings(o, r).empty());
  r.summary.truncated = 2;  // 10%
  r.truncated_at = {"d.jsonl:4", "d.jsonl:9"};
  auto w = prepare_warnings(o, r);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_EQ(w[0], "prepare: WARNING: 2 of 20 records (10.0%) have more than data.max_seq_len = 512 tokens and were "
                  "truncated to 512: the rest of each is not trained; e.g. d.jsonl:4, d.jsonl:9\n"
                  "---> HINT: raise data.max_seq_len (ptk prepare --max-seq-len), or shorten these records; `ptk "
                  "inspect-data` shows what is trained");
  r.summary.truncated = 7;  // more than the positions kept: "..."
  EXPECT_NE(prepare_warnings(o, r)[0].find("e.g. d.jsonl:4, d.jsonl:9, ...\n"), std::string::npos);
  // One drop is enough; the wording follows the format.
  r.summary.truncated = 0;
  r.summary.dropped = 1;
  r.dropped_at = {"p.jsonl:3"};
  o.format = Format::kPreference;
  o.overlong = "drop";
  w = prepare_warnings(o, r);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_EQ(w[0].rfind("prepare: WARNING: 1 of 20 pairs (5.0%) have a prompt + reply over data.max_seq_len = 512 tokens "
                       "and were dropped", 0), 0u) << w[0];
  EXPECT_NE(w[0].find("; e.g. p.jsonl:3\n---> HINT: raise data.max_seq_len"), std::string::npos) << w[0];
  o.format = Format::kRl;
  EXPECT_EQ(prepare_warnings(o, r)[0].rfind("prepare: WARNING: 1 of 20 prompts (5.0%) have more than data.max_seq_len", 0), 0u);
  o.format = Format::kSft;
  o.overlong = "truncate";
  EXPECT_NE(prepare_warnings(o, r)[0].find("left them without a completion token"), std::string::npos);
}

// Through prepare: the positions are the records' file:line, and a reused folder warns again.
TEST(Prepare, WarningPositionsFromARealPrepare) {
  Fixture fx;
  std::string in = fx.dir.write("d.jsonl", R"({"text":"ab"})"
                                           "\n\n"
                                           R"({"text":"0123456789"})"
                                           "\n"
                                           R"({"text":"9876543210"})"
                                           "\n");
  auto o = fx.options(in);
  o.max_seq_len = 6;
  auto r = prepare(o, fx.dir.file("t"));
  EXPECT_EQ(r.truncated_at, (std::vector<std::string>{in + ":3", in + ":4"}));
  auto w = prepare_warnings(o, r);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_NE(w[0].find("2 of 3 records (66.7%) have more than data.max_seq_len = 6 tokens"), std::string::npos) << w[0];
  auto again = prepare(o, fx.dir.file("t"));
  ASSERT_TRUE(again.reused);
  EXPECT_EQ(prepare_warnings(o, again), w);
}

}  // namespace
}  // namespace ptk::data
