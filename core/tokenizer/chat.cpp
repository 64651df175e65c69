// Chat rendering: Qwen2.5's chat template (and plain ChatML) in C++, recognition of
// tokenizer_config.json's template, and per-token assistant masks. Not a Jinja engine: templates
// other than the recognised ones are refused with a hint naming tokenizer.chat_template.
#include <algorithm>

#include "core/tokenizer/tokenizer.h"
#include "core/tokenizer/tokenizer_impl.h"
#include "core/tokenizer/unicode.h"
#include "core/util/error.h"

namespace ptk::tokenizer {

namespace {

// Qwen2.5-Instruct's published chat_template, with its default system prompt replaced by
// @DEFAULT_SYSTEM@ (Qwen2.5 base models ship the same template with "You are a helpful assistant.").
const char* const kQwen25Template = R"JINJA({%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- '@DEFAULT_SYSTEM@' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\n@DEFAULT_SYSTEM@<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %})JINJA";

// Qwen2-Instruct's template: the same rendering for system/user/assistant messages.
const char* const kQwen2Template =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n@DEFAULT_SYSTEM@<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

// The common plain ChatML template (no default system prompt).
const char* const kChatMLTemplate =
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const char* const kPlaceholder = "@DEFAULT_SYSTEM@";

// Drops whitespace outside string literals (the templates strip it with {%- and {{-), keeping
// literals byte for byte, so formatting differences do not matter and content differences do.
std::string canonical(const std::string& t) {
  std::string out;
  char quote = 0;
  for (size_t i = 0; i < t.size(); ++i) {
    char c = t[i];
    if (quote) {
      out += c;
      if (c == '\\' && i + 1 < t.size()) {
        out += t[++i];
      } else if (c == quote) {
        quote = 0;
      }
    } else if (c == '\'' || c == '"') {
      quote = c;
      out += c;
    } else if (c != ' ' && c != '\n' && c != '\t' && c != '\r') {
      out += c;
    }
  }
  return out;
}

// The default system prompt in a Qwen-style template: X in '<|im_start|>system\nX<|im_end|>\n'.
std::string default_system_of(const std::string& t) {
  const std::string open = "'<|im_start|>system\\n", close = "<|im_end|>\\n'";
  for (size_t p = t.find(open); p != std::string::npos; p = t.find(open, p + 1)) {
    size_t b = p + open.size();
    if (b < t.size() && t[b] == '\'') continue;  // the branch that prints messages[0]
    size_t e = t.find(close, b);
    if (e == std::string::npos) return "";
    std::string x = t.substr(b, e - b);
    if (x.empty() || x.find_first_of("'\"\\{}") != std::string::npos) return "";
    return x;
  }
  return "";
}

bool matches(const std::string& tmpl, const char* reference, const std::string& system) {
  std::string ref = reference;
  if (!system.empty()) {
    for (size_t p = ref.find(kPlaceholder); p != std::string::npos; p = ref.find(kPlaceholder, p + system.size()))
      ref.replace(p, std::string(kPlaceholder).size(), system);
  }
  return canonical(tmpl) == canonical(ref);
}

std::string override_hint() {
  return "\n---> HINT: set tokenizer.chat_template=qwen2.5 (ChatML with Qwen's default system prompt) or "
         "tokenizer.chat_template=chatml (plain ChatML) in the recipe, or --chat-template on the command line";
}

}  // namespace

ChatTemplate parse_chat_template(const std::string& name) {
  if (name == "auto") return ChatTemplate::kAuto;
  if (name == "qwen2.5") return ChatTemplate::kQwen25;
  if (name == "chatml") return ChatTemplate::kChatML;
  throw Error("tokenizer.chat_template: unknown value `" + name + "`\n---> HINT: use auto, qwen2.5 or chatml");
}

const char* chat_template_name(ChatTemplate t) {
  switch (t) {
    case ChatTemplate::kAuto: return "auto";
    case ChatTemplate::kQwen25: return "qwen2.5";
    case ChatTemplate::kChatML: return "chatml";
  }
  return "?";
}

void resolve_chat_template(Tokenizer::Impl* im, ChatTemplate requested, const std::string* tmpl,
                           const std::string& origin) {
  std::string system = tmpl ? default_system_of(*tmpl) : "";
  bool qwen = tmpl && !system.empty() && (matches(*tmpl, kQwen25Template, system) || matches(*tmpl, kQwen2Template, system));
  if (qwen) im->default_system = system;
  if (requested != ChatTemplate::kAuto) {
    im->chat = requested;
    return;
  }
  if (qwen) {
    im->chat = ChatTemplate::kQwen25;
  } else if (tmpl && matches(*tmpl, kChatMLTemplate, "")) {
    im->chat = ChatTemplate::kChatML;
  } else if (!tmpl) {
    im->chat_error = origin + ": no chat_template to recognise (tokenizer.chat_template=auto)" + override_hint();
  } else {
    im->chat_error = origin + ": chat_template is not one ptk recognises (Qwen2.5's, Qwen2's or plain ChatML); "
                     "ptk does not run arbitrary Jinja" + override_hint() +
                     " if this model uses that format";
  }
}

ChatTemplate Tokenizer::chat_template() const {
  if (!impl_->chat_error.empty()) throw Error(impl_->chat_error);
  return impl_->chat;
}

namespace {

struct Rendered {
  std::string text;
  std::vector<std::pair<uint32_t, uint32_t>> assistant;  // [content start, end of <|im_end|>)
};

Rendered render(const Tokenizer& tok, const std::vector<Message>& messages, bool add_generation_prompt) {
  const Tokenizer::Impl& im = tok.impl();
  ChatTemplate kind = tok.chat_template();
  if (messages.empty())
    throw Error("chat: a conversation needs at least one message (the Qwen2.5 template reads messages[0])");
  Rendered r;
  size_t total = im.default_system.size() + 64;
  for (const auto& m : messages) total += m.content.size() + 32;
  r.text.reserve(total);
  auto turn = [&](const std::string& role, const std::string& content) {
    r.text += "<|im_start|>";
    r.text += role;
    r.text += '\n';
    size_t b = r.text.size();
    if (unicode::is_valid_utf8(content)) {
      r.text += content;
    } else {
      r.text += unicode::to_valid_utf8(content);
    }
    r.text += "<|im_end|>";
    if (role == "assistant") r.assistant.emplace_back(static_cast<uint32_t>(b), static_cast<uint32_t>(r.text.size()));
    r.text += "\n";
  };
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& role = messages[i].role;
    if (role == "tool")
      throw Error("chat: message " + std::to_string(i) + " has role `tool`: tool messages are not supported yet"
                  "\n---> HINT: drop tool turns from the data; no tokenizer.chat_template value renders them yet");
    if (role != "system" && role != "user" && role != "assistant")
      throw Error("chat: message " + std::to_string(i) + " has role `" + role +
                  "`\n---> HINT: roles are system, user and assistant");
  }
  if (kind == ChatTemplate::kQwen25) {
    if (messages[0].role == "system") {
      turn("system", messages[0].content);
    } else {
      r.text += "<|im_start|>system\n" + im.default_system + "<|im_end|>\n";
    }
    for (size_t i = messages[0].role == "system" ? 1 : 0; i < messages.size(); ++i)
      turn(messages[i].role, messages[i].content);
  } else {
    for (const auto& m : messages) turn(m.role, m.content);
  }
  if (add_generation_prompt) r.text += "<|im_start|>assistant\n";
  return r;
}

}  // namespace

std::string Tokenizer::render_chat_text(const std::vector<Message>& messages, bool add_generation_prompt) const {
  return render(*this, messages, add_generation_prompt).text;
}

std::vector<Message> head_messages(const std::vector<const std::vector<Message>*>& parts, size_t bytes) {
  std::vector<Message> out;
  size_t total = 0;
  for (const auto* part : parts) {
    for (const Message& m : *part) {
      if (total >= bytes) return out;
      if (m.content.size() <= bytes - total) {
        out.push_back(m);
      } else {
        out.push_back({m.role, std::string(utf8_head(m.content, bytes - total))});
      }
      total += out.back().content.size();
    }
  }
  return out;
}

ChatEncoding Tokenizer::render_chat(const std::vector<Message>& messages, bool add_generation_prompt,
                                    size_t max_ids) const {
  const std::vector<Message>* msgs = &messages;
  std::vector<Message> cut;
  Impl::Tail whole = impl_->bounded();  // a huge pre-token merged a window at a time
  Impl::Tail* bounded = nullptr;
  if (max_ids != SIZE_MAX) {
    bounded = &whole;
    const size_t budget = head_bytes(max_ids);
    size_t contents = 0;
    for (const auto& m : messages) contents += m.content.size();
    if (contents > budget) {
      cut = head_messages({&messages}, budget);
      msgs = &cut;
    }
  }
  Rendered r = render(*this, *msgs, add_generation_prompt);
  ChatEncoding out;
  std::vector<uint32_t> starts;
  out.ids.reserve(r.text.size() / 3 + 4);
  starts.reserve(r.text.size() / 3 + 4);
  impl_->encode_into(r.text, &out.ids, &starts, bounded);
  out.assistant_mask.assign(out.ids.size(), 0);
  // A token is masked in when it overlaps an assistant span, as HF's return_assistant_tokens_mask
  // (char_to_token over the span) does: a content's leading newline merged with the header's is in.
  size_t span = 0;
  for (size_t i = 0; i < out.ids.size(); ++i) {
    uint32_t b = starts[i];
    uint32_t e = i + 1 < out.ids.size() ? std::max(starts[i + 1], b + 1) : static_cast<uint32_t>(r.text.size());
    while (span < r.assistant.size() && b >= r.assistant[span].second) ++span;
    if (span < r.assistant.size() && e > r.assistant[span].first) out.assistant_mask[i] = 1;
  }
  if (out.ids.size() > max_ids) {
    out.ids.resize(max_ids);
    out.assistant_mask.resize(max_ids);
  }
  out.text = std::move(r.text);
  return out;
}

}  // namespace ptk::tokenizer
