// RapidJSON helpers: parsing with file:line:column errors, recipes' relaxed syntax (comments,
// trailing commas), and compact/pretty serialisation. Not a schema layer (see core/config).
#pragma once
#include <rapidjson/document.h>

#include <string>
#include <string_view>

namespace ptk::json {

// Relaxed: comments (// and /* */), trailing commas, NaN/Infinity. Strict: plain JSON.
enum class Syntax { kStrict, kRelaxed };

// Parses `text`; on failure throws ptk::Error "<origin>:<line>:<col>: <reason>".
rapidjson::Document parse(std::string_view text, const std::string& origin, Syntax syntax = Syntax::kStrict);
// Reads and parses a whole file.
rapidjson::Document parse_file(const std::string& path, Syntax syntax = Syntax::kStrict);

std::string to_string(const rapidjson::Value& v, bool pretty = false);

// 1-based line and column of a byte offset in `text`.
void line_col(std::string_view text, size_t offset, size_t* line, size_t* col);

// "object", "array", "string", "number", "bool", "null".
const char* type_name(const rapidjson::Value& v);

}  // namespace ptk::json
