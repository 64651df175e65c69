// libFuzzer: ptk's JSON readers on arbitrary bytes: json::parse in both syntaxes, json::parse_into
// with the other flag sets ptk uses (NaN/Inf for metrics, iterative for safetensors headers), and
// data::parse_record in every format. Checks: no crash (a stack overflow from nesting is a crash),
// only ptk::Error thrown; whatever parses nests at most json::kMaxDepth levels and round-trips
// through json::to_string; a depth error points at a [ or { ; and where the text holds too few
// brackets to reach the limit, the result (value, error code, offset) is RapidJSON's own Parse.
// Run with fuzz/json.dict (depth tokens) and fuzz/corpus/json (nested and oversized seeds).
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include "core/util/error.h"
#include "core/util/json.h"
#include "datasets/records.h"

namespace {

using ptk::json::ParseStatus;

// Depth of a parsed value, without recursion (the harness must not be the thing that overflows).
int depth_of(const rapidjson::Value& root) {
  int deepest = 0;
  std::vector<std::pair<const rapidjson::Value*, int>> todo{{&root, 1}};
  while (!todo.empty()) {
    auto [v, d] = todo.back();
    todo.pop_back();
    if (v->IsArray()) {
      deepest = std::max(deepest, d);
      for (const auto& e : v->GetArray()) todo.push_back({&e, d + 1});
    } else if (v->IsObject()) {
      deepest = std::max(deepest, d);
      for (const auto& m : v->GetObject()) todo.push_back({&m.value, d + 1});
    }
  }
  return deepest;
}

// Compact text of a value, NaN/Infinity included. Values are compared by this text: RapidJSON's
// operator== looks each member up by name, so a document with a repeated key (which RapidJSON
// keeps) is not even equal to itself.
std::string text_of(const rapidjson::Value& v) {
  rapidjson::StringBuffer buf;
  rapidjson::Writer<rapidjson::StringBuffer, rapidjson::UTF8<>, rapidjson::UTF8<>, rapidjson::CrtAllocator,
                    rapidjson::kWriteNanAndInfFlag>
      w(buf);
  v.Accept(w);
  return std::string(buf.GetString(), buf.GetSize());
}

void check_status(const ParseStatus& st, std::string_view text, const rapidjson::Document& d) {
  if (st.ok()) {
    if (depth_of(d) > ptk::json::kMaxDepth) abort();
  } else if (st.too_deep) {
    if (st.code != rapidjson::kParseErrorTermination) abort();
    if (st.offset >= text.size() || (text[st.offset] != '[' && text[st.offset] != '{')) abort();
  } else if (st.offset > text.size()) {
    abort();
  }
}

size_t brackets(std::string_view text) {
  size_t n = 0;
  for (char c : text) n += c == '[' || c == '{';
  return n;
}

template <unsigned kFlags>
void parse_with(std::string_view text, bool compare_with_rapidjson) {
  rapidjson::Document d;
  ParseStatus st = ptk::json::parse_into<kFlags>(d, text);
  check_status(st, text, d);
  if (!compare_with_rapidjson) return;
  // Few enough brackets that RapidJSON's own recursive Parse is safe: it must agree exactly.
  rapidjson::Document want;
  want.Parse<kFlags>(text.data(), text.size());
  if (st.too_deep || st.code != want.GetParseError()) abort();
  if (want.HasParseError() ? st.offset != want.GetErrorOffset() : text_of(d) != text_of(want)) abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  for (auto syntax : {ptk::json::Syntax::kStrict, ptk::json::Syntax::kRelaxed}) {
    try {
      rapidjson::Document d = ptk::json::parse(text, "fuzz.json", syntax);
      if (depth_of(d) > ptk::json::kMaxDepth) abort();
      if (syntax == ptk::json::Syntax::kStrict) {  // strict values serialise and read back the same
        // Read back at full precision: RapidJSON's default number parsing can land an ulp or two
        // off the double the writer printed (184467440737095516155 is written as
        // 184467440737095500000.0, which reads back as 1.8446744073709548e20, not ...552e20).
        std::string out = ptk::json::to_string(d);
        rapidjson::Document again;
        if (!ptk::json::parse_into<rapidjson::kParseFullPrecisionFlag>(again, out).ok() || text_of(again) != out) abort();
      }
    } catch (const ptk::Error&) {
      // refused with "<origin>:<line>:<col>: invalid JSON: ...": the expected outcome
    }
  }
  const bool shallow = brackets(text) <= static_cast<size_t>(ptk::json::kMaxDepth);
  parse_with<rapidjson::kParseDefaultFlags>(text, shallow);
  parse_with<rapidjson::kParseNanAndInfFlag>(text, shallow);
  parse_with<rapidjson::kParseIterativeFlag | rapidjson::kParseValidateEncodingFlag>(text, shallow);

  // JSONL records, each line in each format (what `ptk prepare` does on its worker threads).
  for (auto format : {ptk::data::Format::kSft, ptk::data::Format::kPreference, ptk::data::Format::kRl}) {
    size_t b = 0;
    while (b <= text.size()) {
      size_t e = text.find('\n', b);
      if (e == std::string_view::npos) e = text.size();
      ptk::data::Record r;
      std::string reason;
      try {
        if (!ptk::data::parse_record(text.substr(b, e - b), format, &r, &reason) && reason.empty()) abort();
      } catch (const ptk::Error&) {
      }
      b = e + 1;
    }
  }
  return 0;
}
