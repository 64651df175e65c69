// Test helpers for tests/tokenizer: reading the committed golden JSONL files and locating the Qwen
// tokenizer.json. Not assertions.
#pragma once
#include <rapidjson/document.h>

#include <string>
#include <vector>

#include "core/tokenizer/tokenizer.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "tests/support/test_util.h"

namespace ptk::tokenizer::test {

inline std::string data_dir() { return ptk::test::source_dir() + "/tests/tokenizer/data"; }

// One parsed document per non-empty line.
inline std::vector<rapidjson::Document> read_jsonl(const std::string& path) {
  std::vector<rapidjson::Document> out;
  std::string all = read_file(path);
  size_t b = 0, line = 1;
  while (b < all.size()) {
    size_t e = all.find('\n', b);
    if (e == std::string::npos) e = all.size();
    if (e > b) out.push_back(json::parse(std::string_view(all).substr(b, e - b), path + ":" + std::to_string(line)));
    b = e + 1;
    ++line;
  }
  return out;
}

inline std::vector<TokenId> ids_of(const rapidjson::Value& v) {
  std::vector<TokenId> ids;
  for (const auto& x : v.GetArray()) ids.push_back(x.GetInt());
  return ids;
}

inline std::string str(const rapidjson::Value& v) { return std::string(v.GetString(), v.GetStringLength()); }

using ptk::test::qwen_tokenizer_json;

inline std::string hex_decode(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  return out;
}

}  // namespace ptk::tokenizer::test
