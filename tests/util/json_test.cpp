// json::parse / parse_into / parse_file: ptk's one nesting limit (json::kMaxDepth) on hostile input
// (1M levels of [ or {, in both syntaxes, through every parse flag ptk uses), the limit's exact
// boundary, brackets in strings and comments that do not count, error positions as
// <origin>:<line>:<col>, and that texts within the limit parse exactly as RapidJSON's own Parse.
#include <gtest/gtest.h>

#include <rapidjson/error/en.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
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

// json::parse reads numbers exactly (kParseFullPrecisionFlag through parse_into): every double
// RapidJSON's Writer prints comes back bit for bit (RapidJSON's default reader got about a quarter
// of them 1 ulp off), integers keep their 64-bit types, and the integers RapidJSON 1.1's own
// full-precision reader got wrong (fuzz/corpus/json/regression-long-number.json) are right.
TEST(JsonNumbers, EveryDoubleWrittenComesBackBitForBit) {
  std::mt19937_64 rng(7);
  int off_by_default = 0;
  for (int i = 0; i < 20000; ++i) {
    double x;
    do {
      uint64_t bits = rng();
      std::memcpy(&x, &bits, sizeof x);
    } while (!std::isfinite(x));
    if (i % 2) x = std::ldexp(std::fabs(x) / std::pow(2.0, std::ilogb(x)), static_cast<int>(rng() % 40) - 20);
    rapidjson::Value v(x);
    std::string text = "[" + to_string(v) + "]";
    for (Syntax syntax : {Syntax::kStrict, Syntax::kRelaxed}) {
      auto d = parse(text, "t.json", syntax);
      ASSERT_TRUE(d[0].IsDouble()) << text;
      const double y = d[0].GetDouble();
      ASSERT_EQ(std::memcmp(&x, &y, sizeof x), 0) << text << " came back as " << y;
    }
    rapidjson::Document plain;
    plain.Parse(text.c_str());
    off_by_default += plain[0].GetDouble() != x;
  }
  // The reason this exists: RapidJSON's own reader misses some of them (about a quarter).
  EXPECT_GT(off_by_default, 100);
}

TEST(JsonNumbers, IntegersKeepTheirTypesAndLongOnesAreRight) {
  auto one = [](const std::string& t) { return parse("[" + t + "]", "t.json")[0].GetDouble(); };
  auto d = parse("[42, -7, 4294967296, 18446744073709551615, -9223372036854775808, -0, -0.0, 184467440737095516155,"
                 " -9223372036854775809, 18446744073709551616, 1e-400, 4.9e-324, 2.5e-3]", "t.json");
  EXPECT_TRUE(d[0].IsInt() && d[0].IsUint64() && !d[0].IsDouble());
  EXPECT_EQ(d[0].GetInt(), 42);
  EXPECT_TRUE(d[1].IsInt() && !d[1].IsUint());
  EXPECT_EQ(d[1].GetInt(), -7);
  EXPECT_TRUE(d[2].IsUint64() && d[2].IsInt64() && !d[2].IsUint());
  EXPECT_EQ(d[3].GetUint64(), 18446744073709551615ull);
  EXPECT_TRUE(d[4].IsInt64() && !d[4].IsUint64());
  EXPECT_EQ(d[4].GetInt64(), std::numeric_limits<int64_t>::min());
  EXPECT_TRUE(d[5].IsInt());
  EXPECT_EQ(d[5].GetInt(), 0);
  EXPECT_TRUE(d[6].IsDouble() && std::signbit(d[6].GetDouble()));
  for (int i : {7, 8, 9}) EXPECT_TRUE(d[i].IsDouble()) << i;
  EXPECT_EQ(d[7].GetDouble(), std::strtod("184467440737095516155", nullptr));  // RapidJSON 1.1: 1.74e41
  EXPECT_EQ(d[8].GetDouble(), std::strtod("-9223372036854775809", nullptr));
  EXPECT_EQ(d[9].GetDouble(), 18446744073709551616.0);
  EXPECT_EQ(d[10].GetDouble(), 0.0);
  EXPECT_EQ(d[11].GetDouble(), std::numeric_limits<double>::denorm_min());
  EXPECT_EQ(d[12].GetDouble(), 0.0025);
  EXPECT_EQ(one("0.0017006802721088435"), 0.0017006802721088435);
  auto r = parse("[NaN, Infinity, -Infinity, -Inf]", "t.json", Syntax::kRelaxed);
  EXPECT_TRUE(std::isnan(r[0].GetDouble()));
  EXPECT_EQ(r[1].GetDouble(), std::numeric_limits<double>::infinity());
  EXPECT_EQ(r[2].GetDouble(), -std::numeric_limits<double>::infinity());
  EXPECT_EQ(r[3].GetDouble(), -std::numeric_limits<double>::infinity());
  // Syntax errors in numbers stay RapidJSON's, with its offsets.
  EXPECT_EQ(parse_error("[1e999]"), "t.json:1:2: invalid JSON: Number too big to be stored in double.");
  EXPECT_EQ(parse_error("[01]"), "t.json:1:3: invalid JSON: Missing a comma or ']' after an array element.");
  EXPECT_EQ(parse_error("[1.]"), "t.json:1:4: invalid JSON: Miss fraction part in number.");
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
