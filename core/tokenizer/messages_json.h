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

// Whether a record carries tool definitions: a "tools" member that is neither null nor an empty list.
// transformers' apply_chat_template(tools=...) renders them into the system turn (Qwen2.5's "# Tools"
// block) and TRL's SFT, DPO and reward trainers pass a record's "tools" column to it; no built-in
// renderer has them, so callers refuse such a record rather than render it without them.
bool has_tool_definitions(const rapidjson::Value& record);

// Throws ptk::Error naming `where` when has_tool_definitions(record).
void refuse_tool_definitions(const rapidjson::Value& record, const std::string& where);

}  // namespace ptk::tokenizer
