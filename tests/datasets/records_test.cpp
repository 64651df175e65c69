// JSONL readers: every format's good records and each kind of bad record with its exact reason;
// glob expansion with weights; the streaming line reader (CRLF, no final newline, long lines).
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <fstream>
#include <string>
#include <thread>

#include "core/util/error.h"
#include "datasets/records.h"
#include "tests/support/test_util.h"

namespace ptk::data {
namespace {

std::string reason_of(const std::string& line, Format f) {
  Record r;
  std::string reason;
  EXPECT_FALSE(parse_record(line, f, &r, &reason)) << line;
  return reason;
}

// A line nested past json::kMaxDepth (1M levels here) is a bad record with a reason, in every
// format; it used to overflow the stack (exit 139) with no file or line named. Within the limit a
// deep line is still read (a tool schema nests a few dozen levels).
TEST(Records, DeeplyNestedLinesAreBadRecordsNotCrashes) {
  const std::string deep(1000000, '[');
  for (Format f : {Format::kSft, Format::kPreference, Format::kRl}) {
    // {"text": [[[...: the bracket that opens level 513 is at byte 9 + 511.
    EXPECT_EQ(reason_of("{\"text\": " + deep, f), "invalid JSON at column 521: nested deeper than 512 levels");
    EXPECT_EQ(reason_of(deep + std::string(1000000, ']'), f), "invalid JSON at column 513: nested deeper than 512 levels");
    std::string objects;
    for (int i = 0; i < 1000000; ++i) objects += "{\"a\":";
    EXPECT_EQ(reason_of(objects, f), "invalid JSON at column 2561: nested deeper than 512 levels");
  }
  Record r;
  std::string why;
  EXPECT_TRUE(parse_record("{\"text\": \"x\", \"tools\": " + std::string(500, '[') + std::string(500, ']') + "}",
                           Format::kSft, &r, &why))
      << why;
}

TEST(Records, SftMessages) {
  Record r;
  std::string why;
  ASSERT_TRUE(parse_record(R"({"messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"},)"
                           R"({"role":"assistant","content":"yo"}],"id":7})",
                           Format::kSft, &r, &why))
      << why;
  EXPECT_EQ(r.sft.kind, SftRecord::Kind::kMessages);
  ASSERT_EQ(r.sft.messages.size(), 3u);
  EXPECT_EQ(r.sft.messages[2].role, "assistant");
  EXPECT_EQ(r.sft.messages[2].content, "yo");
}

TEST(Records, SftPromptCompletionAndText) {
  Record r;
  std::string why;
  ASSERT_TRUE(parse_record(R"({"prompt":"2+2=","completion":"4"})", Format::kSft, &r, &why)) << why;
  EXPECT_EQ(r.sft.kind, SftRecord::Kind::kPromptCompletion);
  EXPECT_FALSE(r.sft.prompt.is_messages);
  EXPECT_EQ(r.sft.completion.text, "4");
  ASSERT_TRUE(parse_record(R"({"prompt":[{"role":"user","content":"q"}],"completion":[{"role":"assistant","content":"a"}]})",
                           Format::kSft, &r, &why))
      << why;
  EXPECT_TRUE(r.sft.prompt.is_messages);
  ASSERT_TRUE(parse_record(R"({"text":"caf\u00e9 \u00e9t\u00e9"})", Format::kSft, &r, &why)) << why;
  EXPECT_EQ(r.sft.kind, SftRecord::Kind::kText);
  EXPECT_EQ(r.sft.text, "caf\xC3\xA9 \xC3\xA9t\xC3\xA9");
}

TEST(Records, SftBadRecords) {
  const Format f = Format::kSft;
  EXPECT_EQ(reason_of(R"({"messages": [}")", f), "invalid JSON at column 15: Invalid value.");
  EXPECT_EQ(reason_of(R"({"text": "a" "b"})", f), "invalid JSON at column 14: Missing a comma or '}' after an object member.");
  EXPECT_EQ(reason_of("{\"text\": \"a\xFF\"}", f), "invalid UTF-8 at byte 12");
  EXPECT_EQ(reason_of("{\"text\": \"\xE2\x82\"}", f), "invalid UTF-8 at byte 11");  // cut 3-byte sequence
  EXPECT_EQ(reason_of("{\"text\": \"\xED\xA0\x80\"}", f), "invalid UTF-8 at byte 11");  // UTF-8-encoded surrogate
  EXPECT_EQ(reason_of(R"({"text": "\ud800"})", f), "invalid JSON at column 11: The surrogate pair in string is invalid.");
  EXPECT_EQ(reason_of(R"([1, 2])", f), "expected a JSON object, got array");
  EXPECT_EQ(reason_of(R"({"id": 1})", f),
            "no \"messages\", \"conversations\", \"prompt\"/\"completion\", \"instruction\"/\"output\" or \"text\" "
            "field (an sft record needs one of them; data.columns maps other names)");
  EXPECT_EQ(reason_of(R"({"prompt": "q"})", f), "missing field \"completion\"");
  EXPECT_EQ(reason_of(R"({"prompt": "q", "completion": 4})", f),
            "field \"completion\" must be a string or a list of messages, got number");
  EXPECT_EQ(reason_of(R"({"prompt": "q", "completion": ""})", f), "empty \"completion\"");
  EXPECT_EQ(reason_of(R"({"prompt": "q", "completion": [{"role":"assistant","content":"a"}]})", f),
            "\"prompt\" and \"completion\" must both be strings or both be message lists");
  EXPECT_EQ(reason_of(R"({"text": ""})", f), "empty \"text\"");
  EXPECT_EQ(reason_of(R"({"text": ["a"]})", f), "field \"text\" must be a string, got array");
  EXPECT_EQ(reason_of(R"({"messages": "hi"})", f), "\"messages\" must be a list of messages, got string");
  EXPECT_EQ(reason_of(R"({"messages": []})", f), "\"messages\" is empty");
  EXPECT_EQ(reason_of(R"({"messages": [{"role":"user","content":"a"},{"role":"bot","content":"b"}]})", f),
            "messages[1].role \"bot\" is not one of system, user, assistant, tool");
  EXPECT_EQ(reason_of(R"({"messages": [{"role":"user"}]})", f), "messages[0].content missing");
  EXPECT_EQ(reason_of(R"({"messages": [{"content":"x"}]})", f), "messages[0].role missing");
  EXPECT_EQ(reason_of(R"({"messages": [{"role":"user","content":[{"type":"text"}]}]})", f),
            "messages[0].content must be a string, got array (content parts lists are not supported)");
  EXPECT_EQ(reason_of(R"({"messages": [{"role":"user","content":"a"}]})", f),
            "no assistant message in \"messages\" (nothing to train on)");
  EXPECT_EQ(reason_of(R"({"messages": [{"role":"user","content":"","tool_calls":[{}]}]})", f),
            "messages[0].tool_calls on a user message (only assistant messages make tool calls)");
  EXPECT_EQ(reason_of(R"({"messages": [{"role":"assistant","content":"a"}],"tools":{"a":1}})", f),
            "\"tools\" must be a list of tool definitions, got object");
  EXPECT_EQ(reason_of(R"({"messages": [3]})", f), "messages[0] must be an object with role and content, got number");
}

// TRL's SFT, DPO, reward and GRPO trainers pass a chat record's "tools" (a list, or its JSON text)
// and "chat_template_kwargs" to apply_chat_template; ptk keeps them with the record (ChatExtras), and
// tool calls / tool messages in the messages. Plain-text records ignore them, as in TRL.
TEST(Records, ChatRecordsKeepToolDefinitionsAndToolCalls) {
  const std::string msgs =
      R"("messages":[{"role":"user","content":"hi"},{"role":"assistant","content":null,"tool_calls":[{"type":"function",)"
      R"("function":{"name":"f","arguments":{}}}]},{"role":"tool","content":"1","tool_call_id":"c"},)"
      R"({"role":"assistant","content":"yo"}])";
  Record r;
  std::string w;
  ASSERT_TRUE(parse_record("{" + msgs + R"(,"tools":[{"type":"function"}],"chat_template_kwargs":{"x":1}})", Format::kSft, &r, &w)) << w;
  EXPECT_EQ(r.sft.chat.tools, R"([{"type":"function"}])");
  EXPECT_EQ(r.sft.chat.kwargs, R"({"x":1})");
  ASSERT_EQ(r.sft.messages.size(), 4u);
  EXPECT_EQ(r.sft.messages[2].role, "tool");
  EXPECT_NE(r.sft.messages[1].json.find("\"tool_calls\""), std::string::npos);
  EXPECT_NE(r.sft.messages[2].json.find("\"tool_call_id\":\"c\""), std::string::npos);
  EXPECT_TRUE(r.sft.messages[3].json.empty());
  ASSERT_TRUE(parse_record(R"({"prompt":[{"role":"user","content":"hi"}],"completion":[{"role":"assistant","content":"yo"}],"tools":"[{}]"})",
                           Format::kSft, &r, &w)) << w;
  EXPECT_EQ(r.sft.chat.tools, "[{}]");
  ASSERT_TRUE(parse_record(R"({"prompt":[{"role":"user","content":"p"}],"chosen":[{"role":"assistant","content":"a"}],)"
                           R"("rejected":[{"role":"assistant","content":"b"}],"tools":[{}]})", Format::kPreference, &r, &w)) << w;
  EXPECT_EQ(r.preference.chat.tools, "[{}]");
  ASSERT_TRUE(parse_record(R"({"prompt":[{"role":"user","content":"p"}],"answer":"1","tools":[{}]})", Format::kRl, &r, &w)) << w;
  EXPECT_EQ(r.rl.chat.tools, "[{}]");
  for (const std::string& ok : {std::string(R"({"prompt":"p","completion":"c","tools":[{}]})")})
    EXPECT_TRUE(parse_record(ok, Format::kSft, &r, &w)) << ok << ": " << w;
  EXPECT_TRUE(parse_record(R"({"prompt":"p","chosen":"a","rejected":"b","tools":3})", Format::kPreference, &r, &w)) << w;
}

TEST(Records, Preference) {
  Record r;
  std::string why;
  ASSERT_TRUE(parse_record(R"({"prompt":"p","chosen":"good","rejected":"bad"})", Format::kPreference, &r, &why)) << why;
  EXPECT_EQ(r.preference.chosen.text, "good");
  ASSERT_TRUE(parse_record(R"({"prompt":[{"role":"user","content":"q"}],"chosen":[{"role":"assistant","content":"a"}],)"
                           R"("rejected":[{"role":"assistant","content":"b"}]})",
                           Format::kPreference, &r, &why))
      << why;
  EXPECT_TRUE(r.preference.rejected.is_messages);
  EXPECT_EQ(r.preference.rejected.messages[0].content, "b");
  const Format f = Format::kPreference;
  EXPECT_EQ(reason_of(R"({"prompt":"p","chosen":"good"})", f), "missing field \"rejected\"");
  // No "prompt": an implicit prompt (readers_test.cpp), here empty as TRL's extract_prompt makes it.
  ASSERT_TRUE(parse_record(R"({"chosen":"a","rejected":"b"})", f, &r, &why)) << why;
  EXPECT_EQ(r.preference.prompt.text, "");
  EXPECT_EQ(r.preference.chosen.text, "a");
  EXPECT_EQ(reason_of(R"({"prompt":"p","chosen":"","rejected":"b"})", f), "empty \"chosen\"");
  EXPECT_EQ(reason_of(R"({"prompt":"p","chosen":"a","rejected":null})", f),
            "field \"rejected\" must be a string or a list of messages, got null");
  EXPECT_EQ(reason_of(R"({"prompt":"p","chosen":[{"role":"assistant","content":"a"}],"rejected":"b"})", f),
            "\"prompt\", \"chosen\" and \"rejected\" must all be strings or all be message lists");
  EXPECT_EQ(reason_of(R"({"prompt":[{"role":"human","content":"q"}],"chosen":[],"rejected":[]})", f),
            "prompt[0].role \"human\" is not one of system, user, assistant, tool");
}

TEST(Records, RlPromptsKeepAnswerAndExtraFields) {
  Record r;
  std::string why;
  ASSERT_TRUE(parse_record(R"({"prompt": "1+1?", "answer": "2", "level": 3, "tags": ["a"]})", Format::kRl, &r, &why)) << why;
  EXPECT_EQ(r.rl.answer, "2");
  EXPECT_EQ(r.rl.record_json, R"({"prompt":"1+1?","answer":"2","level":3,"tags":["a"]})");
  ASSERT_TRUE(parse_record(R"({"prompt": [{"role":"user","content":"q"}], "answer": 72})", Format::kRl, &r, &why)) << why;
  EXPECT_EQ(r.rl.answer, "72");
  EXPECT_TRUE(r.rl.prompt.is_messages);
  EXPECT_EQ(reason_of(R"({"prompt": "q"})", Format::kRl), "missing field \"answer\"");
  EXPECT_EQ(reason_of(R"({"prompt": "q", "answer": [1]})", Format::kRl), "field \"answer\" must be a string or a number, got array");
  EXPECT_EQ(reason_of(R"({"prompt": "", "answer": "1"})", Format::kRl), "empty \"prompt\"");
  EXPECT_EQ(reason_of(R"({"question": "q", "answer": "1"})", Format::kRl), "missing field \"prompt\"");
}

TEST(Records, FormatNames) {
  EXPECT_EQ(parse_format("preference"), Format::kPreference);
  EXPECT_STREQ(format_name(Format::kRl), "rl");
  try {
    parse_format("dpo");
    FAIL();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "unknown data format `dpo`; choose sft | preference | rl");
  }
}

TEST(LineReader, EndingsNumbersAndLongLines) {
  test::TempDir d;
  std::string big(3 << 20, 'x');  // longer than the 1 MiB buffer
  std::string p = d.write("a.jsonl", "one\r\n\ntwo\n" + big + "\nlast");
  LineReader r(p);
  std::string_view line;
  int64_t no = 0;
  std::vector<std::pair<int64_t, std::string>> got;
  while (r.next(&line, &no)) got.emplace_back(no, std::string(line));
  ASSERT_EQ(got.size(), 5u);
  EXPECT_EQ(got[0], std::make_pair(int64_t{1}, std::string("one")));
  EXPECT_EQ(got[1], std::make_pair(int64_t{2}, std::string("")));
  EXPECT_EQ(got[2], std::make_pair(int64_t{3}, std::string("two")));
  EXPECT_EQ(got[3].first, 4);
  EXPECT_EQ(got[3].second, big);
  EXPECT_EQ(got[4], std::make_pair(int64_t{5}, std::string("last")));
  EXPECT_TRUE(is_blank_line(" \t\r"));
  EXPECT_FALSE(is_blank_line(" {"));
  EXPECT_THROW(LineReader(d.file("missing.jsonl")), Error);
}

// Lines longer than the 1 MiB buffer, around its size, with "\r\n", and a last one without "\n":
// next() and append_next() give the same lines from a regular file (read into place in one
// allocation) and from a pipe (appended as they come), and bytes_read() counts every byte.
TEST(LineReader, LongLinesFromFilesAndPipesThroughBothCalls) {
  test::TempDir d;
  const size_t mib = size_t{1} << 20;
  std::vector<std::string> lines = {"a", std::string(3 * mib, 'x'), "", std::string(mib - 1, 'y'),
                                    std::string(mib, 'z'), std::string(mib + 1, 'w'), "b", std::string(2 * mib + 7, 'v')};
  std::string content;
  for (size_t i = 0; i < lines.size(); ++i) content += lines[i] + (i + 1 == lines.size() ? "" : i == 1 ? "\r\n" : "\n");
  const std::string file = d.write("long.jsonl", content);
  ASSERT_EQ(::mkfifo(d.file("pipe").c_str(), 0600), 0);
  for (const std::string& path : {file, d.file("pipe")}) {
    for (bool append : {false, true}) {
      SCOPED_TRACE(path + (append ? " append_next" : " next"));
      std::thread writer;
      if (path != file) writer = std::thread([&] { std::ofstream(d.file("pipe"), std::ios::binary) << content; });
      LineReader r(path);
      std::vector<std::string> got;
      std::string out = "kept";
      int64_t no = 0;
      for (;;) {
        if (append) {
          size_t before = out.size();
          if (!r.append_next(&out, &no)) break;
          got.push_back(out.substr(before));
        } else {
          std::string_view line;
          if (!r.next(&line, &no)) break;
          got.emplace_back(line);
        }
        EXPECT_EQ(no, static_cast<int64_t>(got.size()));
      }
      if (writer.joinable()) writer.join();
      ASSERT_EQ(got.size(), lines.size());
      for (size_t i = 0; i < lines.size(); ++i) EXPECT_TRUE(got[i] == lines[i]) << "line " << i + 1 << " differs";
      EXPECT_EQ(r.bytes_read(), content.size());
      if (append) {
        EXPECT_EQ(out.substr(0, 5), "kepta");
      }
    }
  }
}

TEST(Sources, GlobsWeightsAndErrors) {
  test::TempDir d;
  d.write("b.jsonl", "12");
  d.write("a.jsonl", "1");
  d.write("c.txt", "");
  auto files = expand_sources({{d.path() + "/*.jsonl", 2.5}, {d.file("c.txt"), 1.0}});
  ASSERT_EQ(files.size(), 3u);
  EXPECT_EQ(files[0].path, d.file("a.jsonl"));
  EXPECT_EQ(files[0].weight, 2.5);
  EXPECT_EQ(files[0].size, 1u);
  EXPECT_EQ(files[1].path, d.file("b.jsonl"));
  EXPECT_EQ(files[2].weight, 1.0);
  try {
    expand_sources({{d.file("nope*.jsonl"), 1.0}}, "data.eval");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).substr(0, std::string(e.what()).find('\n')),
              "data.eval[0]: `" + d.file("nope*.jsonl") + "` matches no file");
  }
  try {
    expand_sources({{d.file("a.jsonl"), -1.0}});
    FAIL();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "data.train[0].weight must be a finite number >= 0, got -1.000000");
  }
  EXPECT_THROW(expand_sources({}), Error);
}

}  // namespace
}  // namespace ptk::data
