// Reading chat messages from JSON (`[{"role": ..., "content": ...}, ...]`) with errors that name the
// record. Not a dataset reader: datasets/ and `ptk tokenize --chat` call this per line.
#pragma once
#include <rapidjson/document.h>

#include <string>
#include <vector>

#include "core/tokenizer/tokenizer.h"

namespace ptk::tokenizer {

// Parses a message list. `where` prefixes errors (e.g. "data.jsonl:12: messages"). Refuses (ptk::Error)
// a non-array, a message without string role/content, and tool calls (`tool_calls`, role `tool`),
// which no built-in renderer supports yet.
std::vector<Message> parse_messages(const rapidjson::Value& v, const std::string& where);

}  // namespace ptk::tokenizer
