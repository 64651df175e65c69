// parse_messages: JSON message lists to tokenizer::Message (see messages_json.h).
// Not validation of the conversation's shape (render_chat checks roles).
#include "core/tokenizer/messages_json.h"

#include "core/util/error.h"
#include "core/util/json.h"

namespace ptk::tokenizer {

std::vector<Message> parse_messages(const rapidjson::Value& v, const std::string& where) {
  if (!v.IsArray())
    throw Error(where + ": expected a list of {\"role\", \"content\"} messages, got " + json::type_name(v));
  std::vector<Message> out;
  out.reserve(v.Size());
  for (rapidjson::SizeType i = 0; i < v.Size(); ++i) {
    const auto& m = v[i];
    std::string at = where + "[" + std::to_string(i) + "]";
    if (!m.IsObject()) throw Error(at + ": expected an object with role and content, got " + json::type_name(m));
    if (m.HasMember("tool_calls") && !m["tool_calls"].IsNull())
      throw Error(at + ": tool calls are not supported yet\n---> HINT: drop tool-call turns from the data; "
                       "tokenizer.chat_template (auto | qwen2.5 | chatml) renders none of them");
    if (!m.HasMember("role") || !m["role"].IsString()) throw Error(at + ".role: missing or not a string");
    if (!m.HasMember("content") || !m["content"].IsString())
      throw Error(at + ".content: missing or not a string (content parts lists are not supported)");
    Message msg;
    msg.role.assign(m["role"].GetString(), m["role"].GetStringLength());
    msg.content.assign(m["content"].GetString(), m["content"].GetStringLength());
    if (msg.role == "tool")
      throw Error(at + ".role: tool messages are not supported yet\n---> HINT: drop tool turns from the data");
    out.push_back(std::move(msg));
  }
  return out;
}

bool has_tool_definitions(const rapidjson::Value& record) {
  if (!record.IsObject()) return false;
  auto it = record.FindMember("tools");
  return it != record.MemberEnd() && !it->value.IsNull() && !(it->value.IsArray() && it->value.Empty());
}

void refuse_tool_definitions(const rapidjson::Value& record, const std::string& where) {
  if (has_tool_definitions(record))
    throw Error(where + ": \"tools\" (tool definitions) are not supported: the chat template would render them "
                        "into the system turn, and no tokenizer.chat_template value does\n---> HINT: drop the "
                        "\"tools\" field (and tool-call turns) from the data");
}

}  // namespace ptk::tokenizer
