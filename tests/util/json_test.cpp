// json::parse / parse_into / parse_file: ptk's one nesting limit (json::kMaxDepth) on hostile input
// (1M levels of [ or {, in both syntaxes, through every parse flag ptk uses), the limit's exact
// boundary, brackets in strings and comments that do not count, error positions as
// <origin>:<line>:<col>, and that texts within the limit parse exactly as RapidJSON's own Parse.
#include <gtest/gtest.h>

#include <rapidjson/error/en.h>

#include <string>
#include <vector>

#include "core/util/error.h"
#include "core/util/json.h"
#include "tests/support/test_util.h"

namespace ptk::json {
namespace {

constexpr size_t kMillion = 1000000;

// The error text of json::parse, or "" when it parses.
std::string parse_error(const std::string& text, Syntax syntax = Syntax::kStrict, const std::string& origin = "t.json") {
  try {
    parse(text, origin, syntax);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::string nested_arrays(size_t levels) { return std::string(levels, '[') + std::string(levels, ']'); }

std::string nested_objects(size_t levels) {
  std::string s;
  for (size_t i = 0; i < levels; ++i) s += "{\"a\":";
  s += "1";
  s += std::string(levels, '}');
  return s;
}

TEST(JsonDepth, AMillionLevelsAreRefusedWithOriginLineAndColumn) {
  const std::string deep = "nested deeper than " + std::to_string(kMaxDepth) + " levels";
  for (Syntax syntax : {Syntax::kStrict, Syntax::kRelaxed}) {
    // Closed and unclosed: a crash would not wait for the closing brackets.
    EXPECT_EQ(parse_error(nested_arrays(kMillion), syntax), "t.json:1:513: invalid JSON: " + deep);
    EXPECT_EQ(parse_error(std::string(kMillion, '['), syntax), "t.json:1:513: invalid JSON: " + deep);
    // {"a":{"a":... : the object that opens level 513 starts at byte 512 * 5.
    EXPECT_EQ(parse_error(nested_objects(kMillion), syntax),
              "t.json:1:" + std::to_string(512 * 5 + 1) + ": invalid JSON: " + deep);
    // Mixed, after a few lines: the column counts from the line start.
    std::string mixed = "{\n  \"x\": 1,\n  \"y\": ";
    for (size_t i = 0; i < kMillion; ++i) mixed += i % 2 ? "{\"k\":" : "[";
    // Level 513 is the 512th of those openers: 256 "[" and 255 "{\"k\":" before it, from column 8.
    EXPECT_EQ(parse_error(mixed, syntax), "t.json:3:" + std::to_string(8 + 256 + 255 * 5) + ": invalid JSON: " + deep);
  }
}

TEST(JsonDepth, TheLimitIsExact) {
  for (Syntax syntax : {Syntax::kStrict, Syntax::kRelaxed}) {
    EXPECT_EQ(parse_error(nested_arrays(kMaxDepth), syntax), "");
    EXPECT_EQ(parse_error(nested_objects(kMaxDepth), syntax), "");
    EXPECT_NE(parse_error(nested_arrays(kMaxDepth + 1), syntax).find("t.json:1:513: invalid JSON: nested deeper"),
              std::string::npos);
    EXPECT_NE(parse_error(nested_objects(kMaxDepth + 1), syntax).find("nested deeper"), std::string::npos);
  }
  // Siblings do not add up: 1000 arrays side by side, each 500 deep.
  std::string wide = "[";
  for (int i = 0; i < 1000; ++i) wide += (i ? "," : "") + nested_arrays(500);
  wide += "]";
  EXPECT_EQ(parse_error(wide), "");
  // A document at the limit is usable: walk to the bottom.
  auto d = parse(nested_arrays(kMaxDepth), "t.json");
  const rapidjson::Value* v = &d;
  int depth = 1;
  while (v->IsArray() && v->Size() == 1) v = &(*v)[0], ++depth;
  EXPECT_EQ(depth, kMaxDepth);
  EXPECT_EQ(to_string(d).size(), 2u * kMaxDepth);
}

TEST(JsonDepth, BracketsInStringsAndCommentsDoNotCount) {
  std::string many(kMillion, '[');
  EXPECT_EQ(parse_error("[\"" + many + "\"]"), "");
  EXPECT_EQ(parse_error("{\"" + many + "\": \"" + std::string(kMillion, '{') + "\"}"), "");
  EXPECT_EQ(parse_error("[\"\\\"" + many + "\\\\\"]"), "");  // escaped quote inside, escaped backslash at the end
  EXPECT_EQ(parse_error("// " + many + "\n/* " + many + " */ [1]", Syntax::kRelaxed), "");
}

TEST(JsonDepth, AnEarlierSyntaxErrorIsReportedFirst) {
  EXPECT_EQ(parse_error("[1 2, " + std::string(kMillion, '[')), "t.json:1:4: invalid JSON: Missing a comma or ']' after an array element.");
  EXPECT_EQ(parse_error(std::string(10, '[') + "x" + std::string(kMillion, '[')), "t.json:1:11: invalid JSON: Invalid value.");
  // ... and a deep part after the document's end is "not singular", not "too deep".
  EXPECT_EQ(parse_error("[] " + std::string(kMillion, '[')),
            "t.json:1:4: invalid JSON: The document root must not be followed by other values.");
}

// Every flag combination ptk parses with, and a document type with other allocators (records.cpp).
TEST(JsonDepth, ParseIntoEveryFlagSetAndDocumentType) {
  const std::string deep = nested_arrays(kMillion);
  auto check = [&](ParseStatus st, size_t offset) {
    EXPECT_FALSE(st.ok());
    EXPECT_TRUE(st.too_deep);
    EXPECT_EQ(st.code, rapidjson::kParseErrorTermination);
    EXPECT_EQ(st.offset, offset);
    EXPECT_EQ(st.message(), "nested deeper than 512 levels");
  };
  {
    rapidjson::Document d;
    check(parse_into(d, deep), 512);
  }
  {
    rapidjson::Document d;
    check(parse_into<rapidjson::kParseNanAndInfFlag>(d, "{\"a\": NaN, \"b\": " + deep + "}"), 16 + 511);
  }
  {
    rapidjson::Document d;  // the safetensors header's flags (iterative parser)
    check(parse_into<rapidjson::kParseIterativeFlag | rapidjson::kParseValidateEncodingFlag>(d, deep), 512);
  }
  {
    rapidjson::Document d;
    check(parse_into<rapidjson::kParseIterativeFlag>(d, nested_objects(kMillion)), 512 * 5);
  }
  {
    std::vector<char> values(1 << 16), stack(1 << 12);
    rapidjson::MemoryPoolAllocator<> vp(values.data(), values.size()), sp(stack.data(), stack.size());
    rapidjson::GenericDocument<rapidjson::UTF8<>, rapidjson::MemoryPoolAllocator<>, rapidjson::MemoryPoolAllocator<>> d(
        &vp, 1024, &sp);
    check(parse_into(d, deep, &sp), 512);
    // The same document parses a good line afterwards.
    ParseStatus st = parse_into(d, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}", &sp);
    EXPECT_TRUE(st.ok()) << st.message();
    EXPECT_STREQ(d["messages"][0]["content"].GetString(), "hi");
  }
}

// Within the limit, parse_into is RapidJSON's Parse: same value, same error code and offset.
TEST(JsonDepth, WithinTheLimitResultsEqualRapidJsonsOwnParse) {
  const std::vector<std::string> texts = {
      "{\"a\": [1, 2.5, -3e10, true, false, null, \"s\\u00e9\\n\"], \"b\": {}}", "[]", "  7  ", "\"x\"",
      "", "   ", "{not json", "[1, 2", "[1,]", "{\"a\" 1}", "{\"a\": 1,}", "[1] [2]", "{\"a\": 01}",
      "[\"\\x\"]", "[\"\\ud800\"]", "[tru]", "[-Infinity, 1]", "[1e999]", "{\"a\": [}", std::string("[1]\0[", 5),
      "[\"a\xff\"]", "/* c */ [1]", nested_arrays(kMaxDepth), nested_objects(300) + "x"};
  for (const auto& t : texts) {
    for (int relaxed = 0; relaxed < 2; ++relaxed) {
      rapidjson::Document want, got;
      ParseStatus st;
      if (relaxed) {
        constexpr unsigned kFlags = rapidjson::kParseCommentsFlag | rapidjson::kParseTrailingCommasFlag |
                                    rapidjson::kParseNanAndInfFlag | rapidjson::kParseValidateEncodingFlag;
        want.Parse<kFlags>(t.data(), t.size());
        st = parse_into<kFlags>(got, t);
      } else {
        want.Parse(t.data(), t.size());
        st = parse_into(got, t);
      }
      SCOPED_TRACE(t.substr(0, 60) + (relaxed ? " (relaxed)" : ""));
      EXPECT_FALSE(st.too_deep);
      EXPECT_EQ(st.code, want.GetParseError());
      EXPECT_EQ(st.ok(), !want.HasParseError());
      if (want.HasParseError()) {
        EXPECT_EQ(st.offset, want.GetErrorOffset());
        EXPECT_EQ(st.message(), rapidjson::GetParseError_En(want.GetParseError()));
      } else {
        EXPECT_TRUE(got == want);
      }
    }
  }
}

TEST(JsonDepth, ParseFileNamesThePath) {
  test::TempDir d;
  std::string f = d.write("config.json", "{\n\"a\": " + nested_arrays(kMillion) + "}\n");
  try {
    parse_file(f);
    FAIL() << "a 1M-level file parsed";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), f + ":2:" + std::to_string(6 + 511) + ": invalid JSON: nested deeper than 512 levels");
  }
}

}  // namespace
}  // namespace ptk::json
