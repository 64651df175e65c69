// read_message / parse_messages / read_chat_extras: JSON message lists and a record's tool
// definitions to tokenizer::Message and ChatExtras (see messages_json.h). Not validation of the
// conversation's shape (the chat template decides what it renders).
#include "core/tokenizer/messages_json.h"

#include "core/util/error.h"
#include "core/util/json.h"

namespace ptk::tokenizer {

namespace {

bool is_role(const std::string& r) { return r == "system" || r == "user" || r == "assistant" || r == "tool"; }

// Compact JSON of `m` without its null members (transformers drops them before rendering).
std::string without_nulls(const rapidjson::Value& m) {
  rapidjson::Document d(rapidjson::kObjectType);
  for (auto it = m.MemberBegin(); it != m.MemberEnd(); ++it)
    if (!it->value.IsNull())
      d.AddMember(rapidjson::Value(it->name, d.GetAllocator()), rapidjson::Value(it->value, d.GetAllocator()),
                  d.GetAllocator());
  return json::to_string(d);
}

}  // namespace

bool read_message(const rapidjson::Value& m, Message* out, std::string* reason) {
  if (!m.IsObject()) {
    *reason = std::string(" must be an object with role and content, got ") + json::type_name(m);
    return false;
  }
  auto role = m.FindMember("role");
  if (role == m.MemberEnd()) {
    *reason = ".role missing";
    return false;
  }
  if (!role->value.IsString()) {
    *reason = std::string(".role must be a string, got ") + json::type_name(role->value);
    return false;
  }
  out->role.assign(role->value.GetString(), role->value.GetStringLength());
  if (!is_role(out->role)) {
    *reason = ".role \"" + out->role + "\" is not one of system, user, assistant, tool";
    return false;
  }
  auto calls = m.FindMember("tool_calls");
  bool has_calls = calls != m.MemberEnd() && !calls->value.IsNull();
  if (has_calls) {
    if (!calls->value.IsArray()) {
      *reason = std::string(".tool_calls must be a list, got ") + json::type_name(calls->value);
      return false;
    }
    if (out->role != "assistant") {
      *reason = ".tool_calls on a " + out->role + " message (only assistant messages make tool calls)";
      return false;
    }
  }
  auto content = m.FindMember("content");
  bool no_content = content == m.MemberEnd() || content->value.IsNull();
  out->content.clear();
  if (no_content) {
    if (!has_calls) {
      *reason = ".content missing";
      return false;
    }
  } else if (!content->value.IsString()) {
    *reason = std::string(".content must be a string, got ") + json::type_name(content->value) +
              " (content parts lists are not supported)";
    return false;
  } else {
    out->content.assign(content->value.GetString(), content->value.GetStringLength());
  }
  bool plain = true;
  for (auto it = m.MemberBegin(); it != m.MemberEnd() && plain; ++it) {
    std::string_view k(it->name.GetString(), it->name.GetStringLength());
    plain = k == "role" || (k == "content" && it->value.IsString()) || it->value.IsNull();
  }
  out->json = plain ? std::string() : without_nulls(m);
  return true;
}

std::vector<Message> parse_messages(const rapidjson::Value& v, const std::string& where) {
  if (!v.IsArray())
    throw Error(where + ": expected a list of {\"role\", \"content\"} messages, got " + json::type_name(v));
  std::vector<Message> out(v.Size());
  std::string reason;
  for (rapidjson::SizeType i = 0; i < v.Size(); ++i)
    if (!read_message(v[i], &out[i], &reason)) throw Error(where + "[" + std::to_string(i) + "]" + reason);
  return out;
}

bool read_chat_extras(const rapidjson::Value& record, ChatExtras* out, std::string* reason) {
  out->tools.clear();
  out->kwargs.clear();
  if (!record.IsObject()) return true;
  auto tools = record.FindMember("tools");
  if (tools != record.MemberEnd() && !tools->value.IsNull()) {
    const rapidjson::Value* list = &tools->value;
    rapidjson::Document parsed;
    if (list->IsString()) {  // TRL: json.loads(tools) when the column holds JSON text
      try {
        parsed = json::parse(std::string_view(list->GetString(), list->GetStringLength()), "tools");
      } catch (const Error&) {
        *reason = "\"tools\" is a string that is not JSON (a list of tool definitions, or its JSON text)";
        return false;
      }
      list = &parsed;
    }
    if (!list->IsArray()) {
      *reason = std::string("\"tools\" must be a list of tool definitions, got ") + json::type_name(*list);
      return false;
    }
    for (rapidjson::SizeType i = 0; i < list->Size(); ++i)
      if (!(*list)[i].IsObject()) {
        *reason = "\"tools\"[" + std::to_string(i) + "] must be an object (a JSON schema), got " +
                  json::type_name((*list)[i]);
        return false;
      }
    out->tools = json::to_string(*list);
  }
  auto kwargs = record.FindMember("chat_template_kwargs");
  if (kwargs != record.MemberEnd() && !kwargs->value.IsNull()) {
    if (!kwargs->value.IsObject()) {
      *reason = std::string("\"chat_template_kwargs\" must be an object, got ") + json::type_name(kwargs->value);
      return false;
    }
    if (kwargs->value.MemberCount() > 0) out->kwargs = json::to_string(kwargs->value);
  }
  return true;
}

bool has_tool_definitions(const rapidjson::Value& record) {
  if (!record.IsObject()) return false;
  auto it = record.FindMember("tools");
  return it != record.MemberEnd() && !it->value.IsNull() && !(it->value.IsArray() && it->value.Empty());
}

}  // namespace ptk::tokenizer
