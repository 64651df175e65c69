#include "core/util/json.h"

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

rapidjson::Document parse(std::string_view text, const std::string& origin, Syntax syntax) {
  rapidjson::Document doc;
  // Full precision: RapidJSON's default number parser may land 1 ulp off the double its Writer
  // wrote (0.0017006802721088435 read back as ...437), so a value saved in a checkpoint (GRPO's
  // prompt variances in the data cursor) would not come back bit for bit on resume.
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
