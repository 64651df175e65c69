// JSONL record parsing, glob expansion and the streaming line reader (see records.h).
// Not tokenization: prepare.cpp turns records into ids and masks.
#include "datasets/records.h"

#include <glob.h>
#include <rapidjson/error/en.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <new>

#include "core/tokenizer/messages_json.h"
#include "core/util/error.h"
#include "core/util/json.h"

namespace ptk::data {

Format parse_format(const std::string& name) {
  if (name == "sft") return Format::kSft;
  if (name == "preference") return Format::kPreference;
  if (name == "rl") return Format::kRl;
  throw Error("unknown data format `" + name + "`; choose sft | preference | rl");
}

const char* format_name(Format f) {
  switch (f) {
    case Format::kSft: return "sft";
    case Format::kPreference: return "preference";
    case Format::kRl: return "rl";
  }
  return "?";
}

namespace {

// Byte offset of the first ill-formed UTF-8 sequence, or npos.
size_t first_invalid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t n = s.size(), i = 0;
  while (i < n) {
    // ASCII runs eight bytes at a time.
    while (i + 8 <= n) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= n) break;
    unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;  // no surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return i;
    }
    if (i + len > n) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k)
      if (p[i + k] < 0x80 || p[i + k] > 0xBF) return i;
    i += len;
  }
  return std::string_view::npos;
}

using Value = rapidjson::Value;

std::string quoted(const char* field) { return std::string("\"") + field + "\""; }

// A message list; `name` is how errors call it ("messages", "prompt").
bool parse_message_list(const Value& v, const std::string& name, std::vector<tokenizer::Message>* out,
                        std::string* reason) {
  if (!v.IsArray()) {
    *reason = quoted(name.c_str()) + " must be a list of messages, got " + json::type_name(v);
    return false;
  }
  if (v.Empty()) {
    *reason = quoted(name.c_str()) + " is empty";
    return false;
  }
  out->clear();
  out->resize(v.Size());
  for (rapidjson::SizeType i = 0; i < v.Size(); ++i) {
    if (!tokenizer::read_message(v[i], &(*out)[i], reason)) {
      *reason = name + "[" + std::to_string(i) + "]" + *reason;
      return false;
    }
  }
  return true;
}

// A required field that is a string or a message list.
bool parse_text_or_messages(const Value& obj, const char* field, TextOrMessages* out, std::string* reason) {
  auto it = obj.FindMember(field);
  if (it == obj.MemberEnd()) {
    *reason = "missing field " + quoted(field);
    return false;
  }
  const Value& v = it->value;
  if (v.IsString()) {
    out->is_messages = false;
    out->text.assign(v.GetString(), v.GetStringLength());
    return true;
  }
  if (v.IsArray()) {
    out->is_messages = true;
    return parse_message_list(v, field, &out->messages, reason);
  }
  *reason = "field " + quoted(field) + " must be a string or a list of messages, got " + json::type_name(v);
  return false;
}

bool is_empty(const TextOrMessages& t) {
  if (!t.is_messages) return t.text.empty();
  return false;  // a message list was already refused when empty
}

bool has_assistant(const std::vector<tokenizer::Message>& m) {
  return std::any_of(m.begin(), m.end(), [](const tokenizer::Message& x) { return x.role == "assistant"; });
}

// A chat record's "tools" and "chat_template_kwargs" (TRL passes both to apply_chat_template);
// plain-text records ignore them, as TRL does.
bool read_extras(const Value& d, tokenizer::ChatExtras* out, std::string* reason) {
  return tokenizer::read_chat_extras(d, out, reason);
}

// ---- ShareGPT and Alpaca ---------------------------------------------------------------------

// A ShareGPT role ("from") as a chat role; "" for one ptk cannot render. The names LLaMA-Factory's
// sharegpt defaults (human, gpt, system, function_call, observation) and axolotl's role map use.
std::string sharegpt_role(std::string_view from) {
  if (from == "human" || from == "user") return "user";
  if (from == "gpt" || from == "assistant" || from == "chatgpt" || from == "bard" || from == "bing" || from == "model")
    return "assistant";
  if (from == "system") return "system";
  return "";
}

// One ShareGPT message: {"from", "value"} (or {"role", "content"}, which some ShareGPT sets use).
bool parse_sharegpt_message(const Value& m, const std::string& where, tokenizer::Message* out, std::string* reason) {
  if (!m.IsObject()) {
    *reason = where + " must be an object with from and value, got " + json::type_name(m);
    return false;
  }
  const bool from_value = m.HasMember("from");
  const char* role_key = from_value ? "from" : "role";
  const char* content_key = from_value ? "value" : "content";
  auto role = m.FindMember(role_key);
  if (role == m.MemberEnd()) {
    *reason = where + ".from missing";
    return false;
  }
  if (!role->value.IsString()) {
    *reason = where + "." + role_key + " must be a string, got " + json::type_name(role->value);
    return false;
  }
  std::string_view from(role->value.GetString(), role->value.GetStringLength());
  std::string r = sharegpt_role(from);
  if (r.empty()) {
    const bool tool = from == "function_call" || from == "observation" || from == "tool" || from == "function";
    *reason = where + "." + role_key + " \"" + std::string(from) + "\" " +
              (tool ? "is a tool turn (tool calls are not supported)"
                    : "is not one of human, user, gpt, assistant, system");
    return false;
  }
  auto content = m.FindMember(content_key);
  if (content == m.MemberEnd()) {
    *reason = where + "." + content_key + " missing";
    return false;
  }
  if (!content->value.IsString()) {
    *reason = where + "." + content_key + " must be a string, got " + json::type_name(content->value);
    return false;
  }
  out->role = std::move(r);
  out->content.assign(content->value.GetString(), content->value.GetStringLength());
  return true;
}

// "conversations" (and an optional top-level "system" string put first when the list has none).
bool parse_sharegpt(const Value& d, std::vector<tokenizer::Message>* out, std::string* reason) {
  const Value& v = d["conversations"];
  if (!v.IsArray()) {
    *reason = std::string("\"conversations\" must be a list of messages, got ") + json::type_name(v);
    return false;
  }
  if (v.Empty()) {
    *reason = "\"conversations\" is empty";
    return false;
  }
  out->clear();
  for (rapidjson::SizeType i = 0; i < v.Size(); ++i) {
    tokenizer::Message m;
    if (!parse_sharegpt_message(v[i], "conversations[" + std::to_string(i) + "]", &m, reason)) return false;
    out->push_back(std::move(m));
  }
  auto sys = d.FindMember("system");
  if (sys != d.MemberEnd() && sys->value.IsString() && sys->value.GetStringLength() > 0 && out->front().role != "system")
    out->insert(out->begin(), {"system", std::string(sys->value.GetString(), sys->value.GetStringLength())});
  return true;
}

// An optional string field: absent or null is "", anything else but a string is an error.
bool optional_string(const Value& d, const char* field, std::string* out, std::string* reason) {
  out->clear();
  auto it = d.FindMember(field);
  if (it == d.MemberEnd() || it->value.IsNull()) return true;
  if (!it->value.IsString()) {
    *reason = "field " + quoted(field) + " must be a string, got " + json::type_name(it->value);
    return false;
  }
  out->assign(it->value.GetString(), it->value.GetStringLength());
  return true;
}

// Alpaca's prompt as LLaMA-Factory's AlpacaDatasetConverter builds it: [system], a user/assistant
// pair per "history" entry, then the user turn "\n".join(non-empty of instruction, input).
bool parse_alpaca_prompt(const Value& d, std::vector<tokenizer::Message>* out, std::string* reason) {
  out->clear();
  std::string system, instruction, input;
  if (!optional_string(d, "system", &system, reason) || !optional_string(d, "instruction", &instruction, reason) ||
      !optional_string(d, "input", &input, reason))
    return false;
  if (!system.empty()) out->push_back({"system", system});
  auto h = d.FindMember("history");
  if (h != d.MemberEnd() && !h->value.IsNull()) {
    if (!h->value.IsArray()) {
      *reason = std::string("field \"history\" must be a list of [question, answer] pairs, got ") + json::type_name(h->value);
      return false;
    }
    for (rapidjson::SizeType i = 0; i < h->value.Size(); ++i) {
      const Value& pair = h->value[i];
      if (!pair.IsArray() || pair.Size() != 2 || !pair[0].IsString() || !pair[1].IsString()) {
        *reason = "history[" + std::to_string(i) + "] must be a [question, answer] pair of strings";
        return false;
      }
      out->push_back({"user", std::string(pair[0].GetString(), pair[0].GetStringLength())});
      out->push_back({"assistant", std::string(pair[1].GetString(), pair[1].GetStringLength())});
    }
  }
  std::string query = instruction;
  if (!input.empty()) query += (query.empty() ? "" : "\n") + input;
  if (query.empty()) {
    *reason = "empty \"instruction\" and \"input\"";
    return false;
  }
  out->push_back({"user", std::move(query)});
  return true;
}

// A preference reply next to a chat prompt: a message object ({"from","value"} or {"role","content"}),
// a string (one assistant message), or a message list.
bool parse_reply_messages(const Value& d, const char* field, std::vector<tokenizer::Message>* out, std::string* reason) {
  auto it = d.FindMember(field);
  if (it == d.MemberEnd()) {
    *reason = "missing field " + quoted(field);
    return false;
  }
  const Value& v = it->value;
  out->clear();
  if (v.IsString()) {
    if (v.GetStringLength() == 0) {
      *reason = "empty " + quoted(field);
      return false;
    }
    out->push_back({"assistant", std::string(v.GetString(), v.GetStringLength())});
    return true;
  }
  if (v.IsObject()) {
    tokenizer::Message m;
    if (!parse_sharegpt_message(v, field, &m, reason)) return false;
    out->push_back(std::move(m));
    return true;
  }
  if (v.IsArray() && !v.Empty()) {
    for (rapidjson::SizeType i = 0; i < v.Size(); ++i) {
      tokenizer::Message m;
      if (!parse_sharegpt_message(v[i], std::string(field) + "[" + std::to_string(i) + "]", &m, reason)) return false;
      out->push_back(std::move(m));
    }
    return true;
  }
  *reason = "field " + quoted(field) + " must be a message, a string or a list of messages, got " + json::type_name(v);
  return false;
}

void set_messages(TextOrMessages* t, std::vector<tokenizer::Message> m) {
  t->is_messages = true;
  t->text.clear();
  t->messages = std::move(m);
}

// ---- the formats ---------------------------------------------------------------------------------

// A field that is there and not null (pandas and `datasets` write a record's missing fields as null).
bool has(const Value& d, const char* field) {
  auto it = d.FindMember(field);
  return it != d.MemberEnd() && !it->value.IsNull();
}

bool parse_sft(const Value& d, SftRecord* out, std::string* reason) {
  if (has(d, "messages")) {
    out->kind = SftRecord::Kind::kMessages;
    if (!parse_message_list(d["messages"], "messages", &out->messages, reason)) return false;
    if (!read_extras(d, &out->chat, reason)) return false;
    if (!has_assistant(out->messages)) {
      *reason = "no assistant message in \"messages\" (nothing to train on)";
      return false;
    }
    return true;
  }
  if (has(d, "conversations")) {
    out->kind = SftRecord::Kind::kMessages;
    if (!parse_sharegpt(d, &out->messages, reason)) return false;
    if (!read_extras(d, &out->chat, reason)) return false;
    if (!has_assistant(out->messages)) {
      *reason = "no assistant turn in \"conversations\" (nothing to train on)";
      return false;
    }
    return true;
  }
  if (has(d, "prompt") || has(d, "completion")) {
    out->kind = SftRecord::Kind::kPromptCompletion;
    if (!parse_text_or_messages(d, "prompt", &out->prompt, reason)) return false;
    if (!parse_text_or_messages(d, "completion", &out->completion, reason)) return false;
    if (out->prompt.is_messages != out->completion.is_messages) {
      *reason = "\"prompt\" and \"completion\" must both be strings or both be message lists";
      return false;
    }
    if (out->prompt.is_messages && !read_extras(d, &out->chat, reason)) return false;
    if (is_empty(out->completion)) {
      *reason = "empty \"completion\"";
      return false;
    }
    if (out->completion.is_messages && !has_assistant(out->completion.messages)) {
      *reason = "no assistant message in \"completion\" (nothing to train on)";
      return false;
    }
    return true;
  }
  if (has(d, "instruction")) {
    out->kind = SftRecord::Kind::kMessages;
    if (!parse_alpaca_prompt(d, &out->messages, reason)) return false;
    std::string output;
    if (!has(d, "output")) {
      *reason = "missing field \"output\" (an Alpaca record: instruction, input, output)";
      return false;
    }
    if (!optional_string(d, "output", &output, reason)) return false;
    if (output.empty()) {
      *reason = "empty \"output\"";
      return false;
    }
    if (!read_extras(d, &out->chat, reason)) return false;
    out->messages.push_back({"assistant", std::move(output)});
    return true;
  }
  if (has(d, "text")) {
    out->kind = SftRecord::Kind::kText;
    const Value& t = d["text"];
    if (!t.IsString()) {
      *reason = std::string("field \"text\" must be a string, got ") + json::type_name(t);
      return false;
    }
    out->text.assign(t.GetString(), t.GetStringLength());
    if (out->text.empty()) {
      *reason = "empty \"text\"";
      return false;
    }
    return true;
  }
  *reason = "no \"messages\", \"conversations\", \"prompt\"/\"completion\", \"instruction\"/\"output\" or \"text\" field "
            "(an sft record needs one of them; data.columns maps other names)";
  return false;
}

bool check_replies(const PreferenceRecord* out, std::string* reason) {
  if (is_empty(out->chosen)) {
    *reason = "empty \"chosen\"";
    return false;
  }
  if (is_empty(out->rejected)) {
    *reason = "empty \"rejected\"";
    return false;
  }
  return true;
}

bool parse_preference(const Value& d, PreferenceRecord* out, std::string* reason) {
  if (!has(d, "prompt") && (has(d, "conversations") || has(d, "instruction"))) {
    // ShareGPT or Alpaca prompt; replies as messages.
    std::vector<tokenizer::Message> prompt;
    if (has(d, "conversations") ? !parse_sharegpt(d, &prompt, reason) : !parse_alpaca_prompt(d, &prompt, reason))
      return false;
    if (!read_extras(d, &out->chat, reason)) return false;
    std::vector<tokenizer::Message> chosen, rejected;
    auto output = d.FindMember("output");
    if (!has(d, "chosen") && !has(d, "rejected") && output != d.MemberEnd() && output->value.IsArray() &&
        output->value.Size() >= 2 && output->value[0].IsString() && output->value[1].IsString()) {
      // The older ranking form (ChatGLM-Efficient-Tuning, LLaMA-Factory before "chosen"/"rejected"):
      // "output": [best, second, ...], of which, as there, the first two are the pair.
      const Value& o = output->value;
      chosen.push_back({"assistant", std::string(o[0].GetString(), o[0].GetStringLength())});
      rejected.push_back({"assistant", std::string(o[1].GetString(), o[1].GetStringLength())});
    } else {
      if (!parse_reply_messages(d, "chosen", &chosen, reason)) return false;
      if (!parse_reply_messages(d, "rejected", &rejected, reason)) return false;
    }
    if (chosen.size() == 1 && chosen[0].content.empty()) {
      *reason = "empty \"chosen\"";
      return false;
    }
    if (rejected.size() == 1 && rejected[0].content.empty()) {
      *reason = "empty \"rejected\"";
      return false;
    }
    set_messages(&out->prompt, std::move(prompt));
    set_messages(&out->chosen, std::move(chosen));
    set_messages(&out->rejected, std::move(rejected));
    return true;
  }
  if (!has(d, "prompt") && has(d, "chosen") && has(d, "rejected")) {
    // Implicit prompt (hh-rlhf): what TRL's DPOTrainer does with extract_prompt when "prompt" is absent.
    TextOrMessages c, r;
    if (!parse_text_or_messages(d, "chosen", &c, reason)) return false;
    if (!parse_text_or_messages(d, "rejected", &r, reason)) return false;
    if (c.is_messages != r.is_messages) {
      *reason = "\"chosen\" and \"rejected\" must both be strings or both be message lists";
      return false;
    }
    if (c.is_messages) {
      if (!read_extras(d, &out->chat, reason)) return false;
      out->prompt.is_messages = out->chosen.is_messages = out->rejected.is_messages = true;
      if (!extract_prompt(c.messages, r.messages, &out->prompt.messages, &out->chosen.messages, &out->rejected.messages,
                          reason))
        return false;
    } else {
      out->prompt.is_messages = out->chosen.is_messages = out->rejected.is_messages = false;
      if (!extract_prompt(c.text, r.text, &out->prompt.text, &out->chosen.text, &out->rejected.text, reason)) return false;
    }
    return check_replies(out, reason);
  }
  if (!parse_text_or_messages(d, "prompt", &out->prompt, reason)) return false;
  if (!parse_text_or_messages(d, "chosen", &out->chosen, reason)) return false;
  if (!parse_text_or_messages(d, "rejected", &out->rejected, reason)) return false;
  if (out->prompt.is_messages != out->chosen.is_messages || out->chosen.is_messages != out->rejected.is_messages) {
    *reason = "\"prompt\", \"chosen\" and \"rejected\" must all be strings or all be message lists";
    return false;
  }
  if (out->prompt.is_messages && !read_extras(d, &out->chat, reason)) return false;
  return check_replies(out, reason);
}

// "answer" as text (a JSON number is kept as its text); false with *reason when absent or another type.
bool parse_answer(const Value& d, const char* field, std::string* out, std::string* reason) {
  auto it = d.FindMember(field);
  if (it == d.MemberEnd()) {
    *reason = "missing field " + quoted(field);
    return false;
  }
  if (it->value.IsString()) {
    out->assign(it->value.GetString(), it->value.GetStringLength());
  } else if (it->value.IsNumber()) {
    *out = json::to_string(it->value);
  } else {
    *reason = "field " + quoted(field) + " must be a string or a number, got " + json::type_name(it->value);
    return false;
  }
  return true;
}

bool parse_rl(const Value& d, RlRecord* out, std::string* reason) {
  if (!has(d, "prompt") && has(d, "conversations")) {
    std::vector<tokenizer::Message> m;
    if (!parse_sharegpt(d, &m, reason)) return false;
    if (has(d, "answer")) {
      if (!parse_answer(d, "answer", &out->answer, reason)) return false;
    } else if (m.back().role == "assistant" && m.size() > 1) {
      out->answer = m.back().content;  // the reference reply is the answer
      m.pop_back();
    } else {
      *reason = "missing field \"answer\" (and \"conversations\" does not end with an assistant turn to take it from)";
      return false;
    }
    set_messages(&out->prompt, std::move(m));
  } else if (!has(d, "prompt") && has(d, "instruction")) {
    std::vector<tokenizer::Message> m;
    if (!parse_alpaca_prompt(d, &m, reason)) return false;
    if (!parse_answer(d, has(d, "answer") ? "answer" : "output", &out->answer, reason)) return false;
    set_messages(&out->prompt, std::move(m));
  } else {
    if (!parse_text_or_messages(d, "prompt", &out->prompt, reason)) return false;
    if (is_empty(out->prompt)) {
      *reason = "empty \"prompt\"";
      return false;
    }
    if (!parse_answer(d, "answer", &out->answer, reason)) return false;
  }
  if (out->prompt.is_messages && !read_extras(d, &out->chat, reason)) return false;
  out->record_json = json::to_string(d);
  return true;
}

// FNV-1a over what a rapidjson Writer emits: the compact serialisation, never held.
struct HashStream {
  typedef char Ch;
  uint64_t h = 0xcbf29ce484222325ull;
  void Put(char c) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001b3ull;
  }
  void Flush() {}
};

}  // namespace

bool columns_fit(Format format, const std::vector<std::string>& columns,
                 const std::vector<std::pair<std::string, std::string>>& mapping, std::string* need) {
  std::vector<std::string> names = columns;
  for (auto& n : names)
    for (const auto& [field, column] : mapping)
      if (n == column) n = field;
  std::vector<std::vector<const char*>> shapes;
  switch (format) {
    case Format::kSft:
      shapes = {{"messages"}, {"conversations"}, {"prompt", "completion"}, {"instruction", "output"}, {"text"}};
      break;
    case Format::kPreference:
      shapes = {{"chosen", "rejected"}, {"instruction", "output"}};
      break;
    case Format::kRl:
      shapes = {{"prompt", "answer"}, {"conversations"}, {"instruction", "answer"}, {"instruction", "output"}};
      break;
  }
  need->clear();
  for (const auto& shape : shapes) {
    bool all = true;
    std::string one;
    for (const char* f : shape) {
      all = all && std::find(names.begin(), names.end(), f) != names.end();
      one += (one.empty() ? "\"" : " + \"") + std::string(f) + "\"";
    }
    if (all) return true;
    *need += (need->empty() ? "" : " | ") + one;
  }
  return false;
}

const std::vector<std::string>& mappable_fields() {
  static const std::vector<std::string> k{"messages", "conversations", "prompt", "completion", "text",
                                          "chosen",   "rejected",      "answer", "instruction", "input",
                                          "output",   "system",        "history"};
  return k;
}

namespace {

// Byte offsets of the code points of a valid UTF-8 string, plus its size.
std::vector<size_t> code_point_starts(std::string_view s) {
  std::vector<size_t> at;
  at.reserve(s.size() + 1);
  for (size_t i = 0; i < s.size(); ++i)
    if ((static_cast<unsigned char>(s[i]) & 0xC0) != 0x80) at.push_back(i);
  at.push_back(s.size());
  return at;
}

}  // namespace

// trl/data_utils.py extract_prompt, line for line:
//   for idx in range(min(len(chosen), len(rejected))):
//       if chosen[idx] != rejected[idx]:
//           if chosen[idx - 1] == " ": idx -= 1   # (idx - 1 == -1 looks at the last character)
//           break
//   prompt, chosen, rejected = chosen[:idx], chosen[idx:], rejected[idx:]
// With no difference the loop leaves idx at min - 1 (the shorter one's last character goes to the replies).
bool extract_prompt(std::string_view chosen, std::string_view rejected, std::string* prompt, std::string* chosen_out,
                    std::string* rejected_out, std::string* reason) {
  if (chosen.empty() || rejected.empty()) {
    *reason = std::string("empty \"") + (chosen.empty() ? "chosen" : "rejected") + "\" (no prompt to extract)";
    return false;
  }
  const std::vector<size_t> c = code_point_starts(chosen), r = code_point_starts(rejected);
  const size_t nc = c.size() - 1, nr = r.size() - 1, m = std::min(nc, nr);
  auto cp = [](std::string_view s, const std::vector<size_t>& at, size_t i) { return s.substr(at[i], at[i + 1] - at[i]); };
  int64_t idx = static_cast<int64_t>(m) - 1;
  for (size_t i = 0; i < m; ++i) {
    if (cp(chosen, c, i) != cp(rejected, r, i)) {
      idx = static_cast<int64_t>(i);
      const size_t before = i == 0 ? nc - 1 : i - 1;  // Python's chosen[-1] when idx is 0
      if (cp(chosen, c, before) == " ") --idx;
      break;
    }
  }
  if (idx >= 0) {
    const size_t b = c[static_cast<size_t>(idx)];  // the same byte offset in both: the prefix is shared
    *prompt = std::string(chosen.substr(0, b));
    *chosen_out = std::string(chosen.substr(b));
    *rejected_out = std::string(rejected.substr(r[static_cast<size_t>(idx)]));
  } else {  // idx == -1: chosen[:-1], chosen[-1:], rejected[-1:]
    *prompt = std::string(chosen.substr(0, c[nc - 1]));
    *chosen_out = std::string(chosen.substr(c[nc - 1]));
    *rejected_out = std::string(rejected.substr(r[nr - 1]));
  }
  return true;
}

bool extract_prompt(const std::vector<tokenizer::Message>& chosen, const std::vector<tokenizer::Message>& rejected,
                    std::vector<tokenizer::Message>* prompt, std::vector<tokenizer::Message>* chosen_out,
                    std::vector<tokenizer::Message>* rejected_out, std::string* reason) {
  const size_t m = std::min(chosen.size(), rejected.size());
  if (m == 0) {
    *reason = std::string("empty \"") + (chosen.empty() ? "chosen" : "rejected") + "\" (no prompt to extract)";
    return false;
  }
  size_t idx = m - 1;
  for (size_t i = 0; i < m; ++i) {
    // TRL compares whole message dicts: tool_calls, name, reasoning_content too (Message::json holds
    // them, compactly in the record's key order).
    if (chosen[i].role != rejected[i].role || chosen[i].content != rejected[i].content ||
        chosen[i].json != rejected[i].json) {
      idx = i;  // a message never equals " ": no space rule
      break;
    }
  }
  if (idx == 0) {
    *reason = "\"chosen\" and \"rejected\" differ from their first message: no shared prompt to extract "
              "(give a \"prompt\" field)";
    return false;
  }
  prompt->assign(chosen.begin(), chosen.begin() + static_cast<std::ptrdiff_t>(idx));
  chosen_out->assign(chosen.begin() + static_cast<std::ptrdiff_t>(idx), chosen.end());
  rejected_out->assign(rejected.begin() + static_cast<std::ptrdiff_t>(idx), rejected.end());
  return true;
}

bool parse_record(std::string_view line, Format format, Record* out, std::string* reason) {
  return parse_record(line, format, ParseOptions{}, out, reason);
}

bool parse_record(std::string_view line, Format format, const ParseOptions& options, Record* out, std::string* reason) {
  size_t bad = first_invalid_utf8(line);
  if (bad != std::string_view::npos) {
    *reason = "invalid UTF-8 at byte " + std::to_string(bad + 1);
    return false;
  }
  // Parse memory reused line after line on each thread: a fresh Document malloc'd (and freed) a 64 KiB
  // value pool and a parse stack for every line.
  struct Arena {
    std::vector<char> values = std::vector<char>(1 << 20), stack = std::vector<char>(256 << 10);
    rapidjson::MemoryPoolAllocator<> value_pool{values.data(), values.size()};
    rapidjson::MemoryPoolAllocator<> stack_pool{stack.data(), stack.size()};
    size_t stack_chunk = 64 << 10;  // stack_pool's chunk capacity (rapidjson's default)
  };
  thread_local Arena arena;
  // A string is decoded on the parse stack before it is copied out, and the stack grows by 1.5x:
  // in a pool of small chunks every step leaves its old copy behind (3x a long line's string in
  // all, until the next line). One chunk the size of the line lets the stack grow in place.
  const size_t stack_chunk = line.size() > (192u << 10) ? line.size() + (64u << 10) : (64u << 10);
  if (stack_chunk != arena.stack_chunk) {
    arena.stack_pool.~MemoryPoolAllocator();  // rapidjson 1.1 has no way to change the chunk size
    new (&arena.stack_pool) rapidjson::MemoryPoolAllocator<>(arena.stack.data(), arena.stack.size(), stack_chunk);
    arena.stack_chunk = stack_chunk;
  }
  arena.value_pool.Clear();  // frees any chunk a long line added; the buffers stay
  arena.stack_pool.Clear();
  rapidjson::GenericDocument<rapidjson::UTF8<>, rapidjson::MemoryPoolAllocator<>, rapidjson::MemoryPoolAllocator<>> d(
      &arena.value_pool, 1024, &arena.stack_pool);
  json::ParseStatus st = json::parse_into(d, line, &arena.stack_pool);  // refuses nesting past json::kMaxDepth
  if (!st.ok()) {
    *reason = "invalid JSON at column " + std::to_string(st.offset + 1) + ": " + st.message();
    return false;
  }
  if (!d.IsObject()) {
    *reason = std::string("expected a JSON object, got ") + json::type_name(d);
    return false;
  }
  // Nothing on the parse stack is needed past the parse (the values live in value_pool): give a
  // long line's decoded strings back before the record copies them out.
  arena.stack_pool.Clear();
  if (options.content_hash) {
    // Top-level nulls count as absent here as everywhere (Parquet rows leave null columns out,
    // `datasets` writes them into JSONL as null): the same record hashes the same in every format.
    HashStream hs;
    rapidjson::Writer<HashStream> w(hs);
    w.StartObject();
    rapidjson::SizeType n = 0;
    for (auto it = d.MemberBegin(); it != d.MemberEnd(); ++it) {
      if (it->value.IsNull()) continue;
      w.Key(it->name.GetString(), it->name.GetStringLength());
      it->value.Accept(w);
      ++n;
    }
    w.EndObject(n);
    *options.content_hash = hs.h;
  }
  // data.columns: every mapped column taken out first, then put back under ptk's name (so a mapping
  // may swap two names); a field of that name already there gives way to the mapped column.
  std::string absent;  // mapped columns this record lacks, for the reason when it is refused
  if (options.columns && !options.columns->empty()) {
    auto& a = d.GetAllocator();
    std::vector<std::pair<const std::string*, Value>> moved;
    for (const auto& [field, column] : *options.columns) {
      auto it = d.FindMember(column.c_str());
      if (it == d.MemberEnd()) {
        absent += (absent.empty() ? "" : ", ") + quoted(column.c_str()) + " (data.columns." + field + ")";
        continue;
      }
      moved.emplace_back(&field, Value());
      moved.back().second = it->value;  // rapidjson's assignment moves
      d.EraseMember(it);
    }
    for (auto& [field, value] : moved) {
      d.RemoveMember(field->c_str());
      d.AddMember(Value(field->c_str(), static_cast<rapidjson::SizeType>(field->size()), a), value, a);
    }
  }
  bool ok = false;
  switch (format) {
    case Format::kSft: ok = parse_sft(d, &out->sft, reason); break;
    case Format::kPreference: ok = parse_preference(d, &out->preference, reason); break;
    case Format::kRl: ok = parse_rl(d, &out->rl, reason); break;
  }
  if (!ok && !absent.empty()) *reason += "; the record has no column " + absent;
  return ok;
}

std::vector<SourceFile> expand_sources(const std::vector<config::DataSource>& sources, const std::string& key) {
  std::vector<SourceFile> out;
  for (size_t i = 0; i < sources.size(); ++i) {
    const auto& s = sources[i];
    std::string where = key + "[" + std::to_string(i) + "]";
    if (!std::isfinite(s.weight) || s.weight < 0)
      throw Error(where + ".weight must be a finite number >= 0, got " + std::to_string(s.weight));
    if (s.path.empty()) throw Error(where + ".path is empty");
    glob_t g{};
    int rc = ::glob(s.path.c_str(), GLOB_ERR, nullptr, &g);
    if (rc == GLOB_NOMATCH || (rc == 0 && g.gl_pathc == 0)) {
      globfree(&g);
      throw Error(where + ": `" + s.path + "` matches no file\n---> HINT: paths are relative to the working directory; "
                  "check the spelling or run from the folder the recipe expects");
    }
    if (rc != 0) {
      globfree(&g);
      throw Error(where + ": cannot expand `" + s.path + "`: " + std::strerror(errno));
    }
    std::vector<std::string> paths(g.gl_pathv, g.gl_pathv + g.gl_pathc);
    globfree(&g);
    std::sort(paths.begin(), paths.end());
    for (auto& p : paths) {
      struct stat st {};
      if (::stat(p.c_str(), &st) != 0) throw Error(where + ": cannot stat " + p + ": " + std::strerror(errno));
      if (S_ISDIR(st.st_mode)) throw Error(where + ": " + p + " is a folder\n---> HINT: use a glob such as " + p + "/*.jsonl");
      out.push_back({p, s.weight, static_cast<uint64_t>(st.st_size)});
    }
  }
  if (out.empty()) throw Error(key + " lists no data files\n---> HINT: set " + key + "=[\"file.jsonl\"] or pass --input");
  return out;
}

bool is_blank_line(std::string_view line) {
  return line.find_first_not_of(" \t\r") == std::string_view::npos;
}

LineReader::LineReader(const std::string& path) : path_(path), buf_(1 << 20) {
  f_ = std::fopen(path.c_str(), "rb");
  if (!f_) throw Error("cannot open " + path + ": " + std::strerror(errno));
  struct stat st {};
  seekable_ = ::fstat(fileno(f_), &st) == 0 && S_ISREG(st.st_mode);
  if (seekable_) {  // gzip by its magic bytes (a pipe is read as it is)
    unsigned char magic[2] = {0, 0};
    const size_t n = std::fread(magic, 1, 2, f_);
    std::rewind(f_);
    if (n == 2 && magic[0] == 0x1f && magic[1] == 0x8b) {
      int fd = ::dup(fileno(f_));
      gzFile gz = fd >= 0 ? gzdopen(fd, "rb") : nullptr;
      if (!gz) {
        if (fd >= 0) ::close(fd);
        std::fclose(f_);
        f_ = nullptr;
        throw Error("cannot open " + path + " as gzip");
      }
      gzbuffer(gz, 1 << 18);
      gz_ = gz;
      seekable_ = false;  // lines are appended as they come, as from a pipe
    }
  }
}

LineReader::~LineReader() {
  if (gz_) gzclose(static_cast<gzFile>(gz_));
  if (f_) std::fclose(f_);
}

uint64_t LineReader::bytes_read() const {
  if (gz_) return static_cast<uint64_t>(std::max<z_off_t>(0, gzoffset(static_cast<gzFile>(gz_))));
  return consumed_;
}

size_t LineReader::read_some(char* to, size_t n) {
  if (gz_) {
    gzFile gz = static_cast<gzFile>(gz_);
    int got = gzread(gz, to, static_cast<unsigned>(std::min<size_t>(n, 1u << 30)));
    if (got < 0) {
      int code = 0;
      const char* msg = gzerror(gz, &code);
      throw Error("cannot read " + path_ + " (gzip): " + (msg ? msg : "error") +
                  "\n---> HINT: the file is truncated or not gzip; check it with `gzip -t " + path_ + "`");
    }
    if (got == 0) {
      int code = 0;
      gzerror(gz, &code);
      if (code == Z_BUF_ERROR)  // zlib: the stream ended before its end marker
        throw Error("cannot read " + path_ + " (gzip): the file is truncated\n---> HINT: download it again; `gzip -t " +
                    path_ + "` checks it");
      if (code != Z_OK) throw Error("cannot read " + path_ + " (gzip): " + gzerror(gz, &code));
    }
    return static_cast<size_t>(got);
  }
  size_t got = std::fread(to, 1, n, f_);
  if (got == 0 && std::ferror(f_)) throw Error("cannot read " + path_ + ": " + std::strerror(errno));
  return got;
}

// Reads more after the buffered bytes (moved to the front first); false at the end of the file or
// when the buffer is full (a line longer than it).
bool LineReader::fill() {
  if (eof_) return false;
  if (begin_ > 0) {  // keep the partial line at the front
    std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
  }
  if (end_ == buf_.size()) return false;
  size_t n = read_some(buf_.data() + end_, buf_.size() - end_);
  if (n == 0) {
    eof_ = true;
    return false;
  }
  end_ += n;
  return true;
}

// Where the line at begin_ ends, when that is in the buffer (read further as needed): kLine (*len
// bytes, then "\n"), kLastLine (*len bytes, then the end of the file), kEnd, or kLong (it does not
// fit: the buffer is full with its start).
LineReader::Found LineReader::buffered_line(size_t* len) {
  size_t scanned = 0;  // bytes after begin_ known to hold no "\n"
  for (;;) {
    const char* from = buf_.data() + begin_ + scanned;
    const char* nl = static_cast<const char*>(std::memchr(from, '\n', end_ - begin_ - scanned));
    if (nl) {
      *len = static_cast<size_t>(nl - (buf_.data() + begin_));
      return Found::kLine;
    }
    scanned = end_ - begin_;
    if (!fill()) {
      if (!eof_) return Found::kLong;
      if (end_ == begin_) return Found::kEnd;
      *len = end_ - begin_;
      return Found::kLastLine;
    }
  }
}

// Appends the line that starts at begin_ and does not fit in the buffer to *out.
namespace {
constexpr size_t kMaxStreamedLineBytes = size_t{1} << 30;
}

void LineReader::read_long(std::string* out) {
  const size_t have = end_ - begin_;
  if (!seekable_) {  // a pipe: append as it comes
    out->append(buf_.data() + begin_, have);
    consumed_ += have;
    begin_ = end_ = 0;
    for (;;) {
      if (!fill()) return;  // the end of the file ends the line
      const char* nl = static_cast<const char*>(std::memchr(buf_.data(), '\n', end_));
      size_t n = nl ? static_cast<size_t>(nl - buf_.data()) : end_;
      // A .gz or a pipe gives no size up front: a small gzip bomb of one endless line must not take
      // all memory (the JSON-array reader caps a record the same way).
      if (out->size() + n > kMaxStreamedLineBytes)
        throw Error(path_ + ":" + std::to_string(line_no_ + 1) + ": a line over 1 GiB (a compressed or piped file is "
                    "read a line at a time; no record is that long)");
      out->append(buf_.data(), n);
      consumed_ += n + (nl ? 1 : 0);
      begin_ = nl ? n + 1 : end_;
      if (nl) return;
    }
  }
  // A regular file: find the line's end first, then read it into place in one allocation.
  const off_t here = ::ftello(f_);
  std::vector<char> scratch(1 << 20);
  uint64_t rest = 0;
  bool newline = false;
  for (;;) {
    size_t n = std::fread(scratch.data(), 1, scratch.size(), f_);
    if (n == 0) {
      if (std::ferror(f_)) throw Error("cannot read " + path_ + ": " + std::strerror(errno));
      break;
    }
    const char* nl = static_cast<const char*>(std::memchr(scratch.data(), '\n', n));
    if (nl) {
      rest += static_cast<uint64_t>(nl - scratch.data());
      newline = true;
      break;
    }
    rest += n;
  }
  std::clearerr(f_);
  if (here < 0 || ::fseeko(f_, here, SEEK_SET) != 0) throw Error("cannot seek in " + path_ + ": " + std::strerror(errno));
  out->reserve(out->size() + have + rest);
  out->append(buf_.data() + begin_, have);
  const size_t at = out->size();
  out->resize(at + rest);
  if (rest > 0 && std::fread(&(*out)[at], 1, rest, f_) != rest)
    throw Error("cannot read " + path_ + ": " + (std::ferror(f_) ? std::strerror(errno) : "it got shorter while read"));
  if (newline && std::fgetc(f_) != '\n') throw Error("cannot read " + path_ + ": it changed while read");
  if (!newline) eof_ = true;
  consumed_ += have + rest + (newline ? 1 : 0);
  begin_ = end_ = 0;
}

// The found line (kLine or kLastLine, `len` bytes in the buffer), consumed.
std::string_view LineReader::take(Found found, size_t len) {
  std::string_view line(buf_.data() + begin_, len);
  const size_t used = found == Found::kLine ? len + 1 : len;  // and its "\n"
  consumed_ += used;
  begin_ += used;
  return line;
}

bool LineReader::next(std::string_view* line, int64_t* line_no) {
  size_t len = 0;
  const Found found = buffered_line(&len);
  if (found == Found::kEnd) return false;
  if (found == Found::kLong) {
    if (long_.capacity() > (64u << 20)) std::string().swap(long_);  // not kept after a huge line
    long_.clear();
    read_long(&long_);
    *line = long_;
  } else {
    *line = take(found, len);
  }
  if (!line->empty() && line->back() == '\r') line->remove_suffix(1);
  *line_no = ++line_no_;
  return true;
}

bool LineReader::append_next(std::string* out, int64_t* line_no) {
  const size_t start = out->size();
  size_t len = 0;
  const Found found = buffered_line(&len);
  if (found == Found::kEnd) return false;
  if (found == Found::kLong) {
    read_long(out);
  } else {
    out->append(take(found, len));
  }
  if (out->size() > start && out->back() == '\r') out->pop_back();
  *line_no = ++line_no_;
  return true;
}

}  // namespace ptk::data
