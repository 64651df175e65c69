#include "core/util/json.h"

#include <algorithm>
#include <charconv>
#include <cstdlib>

#include <rapidjson/error/en.h>
#include <rapidjson/prettywriter.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include "core/util/error.h"
#include "core/util/fs.h"

namespace ptk::json {

void line_col(std::string_view text, size_t offset, size_t* line, size_t* col) {
  size_t l = 1, c = 1;
  for (size_t i = 0; i < offset && i < text.size(); ++i) {
    if (text[i] == '\n') {
      ++l;
      c = 1;
    } else {
      ++c;
    }
  }
  *line = l;
  *col = c;
}

std::string ParseStatus::message() const {
  if (too_deep) return "nested deeper than " + std::to_string(kMaxDepth) + " levels";
  return rapidjson::GetParseError_En(code);
}

namespace detail {

Number read_number(const char* s, size_t n) {
  const char* end = s + n;
  Number r{Number::kDouble};
  bool integer = n > 0 && std::none_of(s, end, [](char c) { return c == '.' || c == 'e' || c == 'E' || c == 'N' || c == 'I'; });
  if (integer) {
    const bool minus = *s == '-';
    uint64_t mag = 0;
    auto [p, ec] = std::from_chars(s + minus, end, mag);
    if (ec == std::errc() && p == end) {
      if (!minus) {
        r.kind = Number::kUint64;
        r.u = mag;
        return r;
      }
      if (mag <= (uint64_t{1} << 63)) {
        r.kind = Number::kInt64;
        r.i = static_cast<int64_t>(~mag + 1);  // two's complement: -2^63 included
        return r;
      }
    }
  }
  // NaN and Infinity (relaxed syntax) too: from_chars reads them like strtod, case-insensitively.
  auto [p, ec] = std::from_chars(s, end, r.d);
  if (ec != std::errc() || p != end) r.d = std::strtod(std::string(s, n).c_str(), nullptr);  // under/overflow
  return r;
}

}  // namespace detail

rapidjson::Document parse(std::string_view text, const std::string& origin, Syntax syntax) {
  rapidjson::Document doc;
  // Full precision (exact numbers, detail::exact_number): a double ptk wrote comes back bit for bit.
  constexpr unsigned kRelaxed = rapidjson::kParseCommentsFlag | rapidjson::kParseTrailingCommasFlag |
                                rapidjson::kParseNanAndInfFlag | rapidjson::kParseValidateEncodingFlag |
                                rapidjson::kParseFullPrecisionFlag;
  constexpr unsigned kStrict = rapidjson::kParseValidateEncodingFlag | rapidjson::kParseFullPrecisionFlag;
  ParseStatus st = syntax == Syntax::kRelaxed ? parse_into<kRelaxed>(doc, text) : parse_into<kStrict>(doc, text);
  if (!st.ok()) {
    size_t line, col;
    line_col(text, st.offset, &line, &col);
    throw Error(origin + ":" + std::to_string(line) + ":" + std::to_string(col) + ": invalid JSON: " + st.message());
  }
  return doc;
}

rapidjson::Document parse_file(const std::string& path, Syntax syntax) {
  return parse(read_file(path), path, syntax);
}

std::string to_string(const rapidjson::Value& v, bool pretty) {
  rapidjson::StringBuffer buf;
  if (pretty) {
    rapidjson::PrettyWriter<rapidjson::StringBuffer> w(buf);
    w.SetIndent(' ', 2);
    w.SetFormatOptions(rapidjson::kFormatSingleLineArray);
    v.Accept(w);
  } else {
    rapidjson::Writer<rapidjson::StringBuffer> w(buf);
    v.Accept(w);
  }
  return std::string(buf.GetString(), buf.GetSize());
}

const char* type_name(const rapidjson::Value& v) {
  if (v.IsObject()) return "object";
  if (v.IsArray()) return "array";
  if (v.IsString()) return "string";
  if (v.IsNumber()) return "number";
  if (v.IsBool()) return "bool";
  return "null";
}

}  // namespace ptk::json
