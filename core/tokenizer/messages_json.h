// Reading chat messages from JSON (`[{"role": ..., "content": ...}, ...]`, with OpenAI/TRL tool
// calls and tool messages) and a record's "tools" / "chat_template_kwargs", with errors that name the
// record. Not a dataset reader: datasets/ and `ptk tokenize --chat` call this per line.
#pragma once
#include <rapidjson/document.h>

#include <string>
#include <vector>

#include "core/tokenizer/tokenizer.h"

namespace ptk::tokenizer {

// Reads one message object into *out. On a bad one returns false and sets *reason to what follows the
// message's name in an error, e.g. `.role missing`, ` must be an object with role and content, got a
// string`, `.role "bot" is not one of system, user, assistant, tool`. Accepted: role system | user |
// assistant | tool; content a string, or null / missing on an assistant message with tool_calls;
// tool_calls a list; any other member (name, tool_call_id, reasoning_content, ...) passed on.
bool read_message(const rapidjson::Value& m, Message* out, std::string* reason);

// Parses a message list. `where` prefixes errors (e.g. "data.jsonl:12: messages"). Refuses (ptk::Error)
// a non-array and any message read_message refuses.
std::vector<Message> parse_messages(const rapidjson::Value& v, const std::string& where);

// A record's "tools" (a list of tool definitions, or a JSON string holding one, as TRL reads it; null
// or absent = none) and "chat_template_kwargs" (an object) into *out. False with a reason otherwise.
bool read_chat_extras(const rapidjson::Value& record, ChatExtras* out, std::string* reason);

// Whether a record carries tool definitions: a "tools" member that is neither null nor an empty list.
bool has_tool_definitions(const rapidjson::Value& record);

}  // namespace ptk::tokenizer
