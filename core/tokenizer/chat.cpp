// Chat rendering: the chat template (the tokenizer folder's own, or qwen2.5 / chatml built in, or a
// .jinja file) rendered by the Jinja interpreter (jinja.h) with the context transformers'
// apply_chat_template builds, and per-token assistant masks derived from the rendering itself.
// Not the interpreter, and not a recogniser of templates: recognition only names the template
// (chat_template()) and finds the default system prompt qwen2.5 should use.
#include <algorithm>
#include <filesystem>

#include "core/tokenizer/jinja.h"
#include "core/tokenizer/tokenizer.h"
#include "core/tokenizer/tokenizer_impl.h"
#include "core/tokenizer/unicode.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"

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

std::string substitute_system(const char* reference, const std::string& system) {
  std::string ref = reference;
  for (size_t p = ref.find(kPlaceholder); p != std::string::npos; p = ref.find(kPlaceholder, p + system.size()))
    ref.replace(p, std::string(kPlaceholder).size(), system);
  return ref;
}

const char* const kOverrideHint =
    "\n---> HINT: set tokenizer.chat_template (or --chat-template) to qwen2.5 (Qwen2.5's template, with Qwen's "
    "default system prompt), chatml (plain ChatML) or a .jinja file holding the model's template";

// Whether `s` is inline Jinja rather than a file name.
bool is_inline(const std::string& s) {
  return s.find("{{") != std::string::npos || s.find("{%") != std::string::npos;
}

// The variables apply_chat_template sets itself: a kwarg of that name is a TypeError in transformers
// ("got multiple values for keyword argument"), and here it would replace the messages list.
void refuse_fixed_key(const std::string& name, const std::string& origin) {
  for (const char* k : {"messages", "tools", "documents", "add_generation_prompt"})
    if (name == k)
      throw Error(origin + ": \"" + name + "\" is set by the chat rendering itself and cannot be a template kwarg");
}

// The special tokens transformers puts into every rendering (special_tokens_map: the named ones that
// are set), as a JSON object, followed by LoadOptions::chat_template_kwargs' members.
void chat_globals(const rapidjson::Value* cfg, const std::string& kwargs, const std::string& kwargs_origin,
                  rapidjson::Document* out) {
  out->SetObject();
  auto& a = out->GetAllocator();
  if (cfg && cfg->IsObject()) {
    for (const char* key : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"}) {
      auto it = cfg->FindMember(key);
      if (it == cfg->MemberEnd()) continue;
      const rapidjson::Value* v = &it->value;
      if (v->IsObject() && v->HasMember("content")) v = &(*v)["content"];
      if (!v->IsString()) continue;
      out->AddMember(rapidjson::Value(key, a), rapidjson::Value(*v, a), a);
    }
  }
  if (!kwargs.empty()) {
    rapidjson::Document k = json::parse(kwargs, kwargs_origin);
    if (!k.IsObject()) throw Error(kwargs_origin + ": expected a JSON object, got " + json::type_name(k));
    for (auto it = k.MemberBegin(); it != k.MemberEnd(); ++it) {
      refuse_fixed_key(it->name.GetString(), kwargs_origin);
      auto have = out->FindMember(it->name);
      if (have != out->MemberEnd()) {
        have->value.CopyFrom(it->value, a);
      } else {
        out->AddMember(rapidjson::Value(it->name, a), rapidjson::Value(it->value, a), a);
      }
    }
  }
}

}  // namespace

ChatTemplate parse_chat_template(const std::string& name) {
  if (name == "auto") return ChatTemplate::kAuto;
  if (name == "qwen2.5") return ChatTemplate::kQwen25;
  if (name == "chatml") return ChatTemplate::kChatML;
  throw Error("tokenizer.chat_template: unknown value `" + name +
              "`\n---> HINT: use auto, qwen2.5, chatml, a .jinja file or inline Jinja text");
}

const char* chat_template_name(ChatTemplate t) {
  switch (t) {
    case ChatTemplate::kAuto: return "auto";
    case ChatTemplate::kQwen25: return "qwen2.5";
    case ChatTemplate::kChatML: return "chatml";
    case ChatTemplate::kJinja: return "jinja";
  }
  return "?";
}

LoadOptions chat_load_options(const std::string& chat_template, const std::string& kwargs) {
  LoadOptions o;
  if (chat_template.empty() || chat_template == "auto") {
    o.chat_template = ChatTemplate::kAuto;
  } else if (chat_template == "qwen2.5") {
    o.chat_template = ChatTemplate::kQwen25;
  } else if (chat_template == "chatml") {
    o.chat_template = ChatTemplate::kChatML;
  } else if (is_inline(chat_template)) {
    o.chat_template = ChatTemplate::kJinja;
    o.chat_template_source = chat_template;
  } else {
    if (!path_exists(chat_template) || std::filesystem::is_directory(chat_template))
      throw ChatTemplateError("tokenizer.chat_template: `" + chat_template +
                              "` is neither auto, qwen2.5, chatml nor an existing .jinja file" + kOverrideHint);
    o.chat_template = ChatTemplate::kJinja;
    o.chat_template_source = chat_template;
  }
  if (!kwargs.empty()) {
    rapidjson::Document k = json::parse(kwargs, "tokenizer.chat_template_kwargs");
    if (!k.IsObject())
      throw Error("tokenizer.chat_template_kwargs: expected a JSON object such as {\"enable_thinking\": false}, got " +
                  std::string(json::type_name(k)));
    o.chat_template_kwargs = kwargs;
  }
  return o;
}

void resolve_chat_template(Tokenizer::Impl* im, const LoadOptions& options, const FolderTemplates& folder) {
  const std::string* cfg_tmpl = folder.has_config_default ? &folder.config_default : nullptr;
  std::string system = cfg_tmpl ? default_system_of(*cfg_tmpl) : "";
  bool qwen = cfg_tmpl && !system.empty() &&
              (matches(*cfg_tmpl, kQwen25Template, system) || matches(*cfg_tmpl, kQwen2Template, system));
  if (qwen) im->default_system = system;
  im->chat_overridden = options.chat_template != ChatTemplate::kAuto;
  im->chat_tmpl.reset();
  im->chat_tmpl_tools.reset();
  im->chat_error.clear();
  std::string tools_source;
  switch (options.chat_template) {
    case ChatTemplate::kAuto:
      if (folder.has_file) {
        im->chat_source = folder.file;
        im->chat_origin = folder.file_origin;
      } else if (cfg_tmpl) {
        im->chat_source = *cfg_tmpl;
        im->chat_origin = folder.config_origin;
        if (folder.has_config_tool_use) tools_source = folder.config_tool_use;
      } else {
        im->chat_error = folder.config_origin + ": the tokenizer folder has no chat template (no \"chat_template\" in "
                         "tokenizer_config.json, no chat_template.jinja beside it)" + kOverrideHint;
        return;
      }
      break;
    case ChatTemplate::kQwen25:
      im->chat_source = substitute_system(kQwen25Template, im->default_system);
      im->chat_origin = "built-in qwen2.5 chat template";
      break;
    case ChatTemplate::kChatML:
      im->chat_source = kChatMLTemplate;
      im->chat_origin = "built-in chatml chat template";
      break;
    case ChatTemplate::kJinja:
      if (is_inline(options.chat_template_source)) {
        im->chat_source = options.chat_template_source;
        im->chat_origin = "tokenizer.chat_template (inline)";
      } else {
        try {
          im->chat_source = read_file(options.chat_template_source);
        } catch (const Error& e) {
          throw ChatTemplateError(std::string(e.what()) + "\n---> HINT: tokenizer.chat_template (or --chat-template) "
                                  "names this file; point it at a readable .jinja file");
        }
        im->chat_origin = options.chat_template_source;
      }
      break;
  }
  std::string name = im->chat_source;
  if (matches(name, kChatMLTemplate, "")) {
    im->chat = ChatTemplate::kChatML;
  } else {
    std::string sys = default_system_of(name);
    im->chat = !sys.empty() && (matches(name, kQwen25Template, sys) || matches(name, kQwen2Template, sys))
                   ? ChatTemplate::kQwen25
                   : ChatTemplate::kJinja;
  }
  try {
    im->chat_tmpl = std::make_shared<const jinja::Template>(jinja::Template::parse(im->chat_source, im->chat_origin));
    if (!tools_source.empty())
      im->chat_tmpl_tools = std::make_shared<const jinja::Template>(
          jinja::Template::parse(tools_source, im->chat_origin + " (tool_use)"));
  } catch (const Error& e) {
    im->chat_tmpl.reset();
    im->chat_error = std::string("chat template ") + e.what() + kOverrideHint;
    if (im->chat_overridden) throw ChatTemplateError(im->chat_error);  // asked for by name: fail at once
    return;
  }
  try {
    chat_globals(folder.config, options.chat_template_kwargs, "tokenizer.chat_template_kwargs", &im->chat_globals);
  } catch (const ChatTemplateError&) {
    throw;
  } catch (const Error& e) {
    throw ChatTemplateError(e.what());
  }
}

ChatTemplate Tokenizer::chat_template() const {
  if (!impl_->chat_error.empty()) throw ChatTemplateError(impl_->chat_error);
  return impl_->chat;
}

const std::string& Tokenizer::chat_template_source() const {
  chat_template();
  return impl_->chat_source;
}

const std::string& Tokenizer::chat_template_origin() const { return impl_->chat_origin; }

bool Tokenizer::chat_template_overridden() const { return impl_->chat_overridden; }

namespace {

using rapidjson::Value;

std::string at_message(size_t i, const std::string& role) {
  return "messages[" + std::to_string(i) + "] (" + role + ")";
}

// transformers' _alias_reasoning_fields: a message with reasoning under any of its names gets it as
// "thinking" (first) and "reasoning_content".
void alias_reasoning(Value* m, rapidjson::Document::AllocatorType& a) {
  const Value* r = nullptr;
  for (const char* k : {"reasoning_content", "thinking", "reasoning"}) {
    auto it = m->FindMember(k);
    if (it != m->MemberEnd() && !it->value.IsNull()) {
      r = &it->value;
      break;
    }
  }
  if (!r) return;
  Value reasoning(*r, a);
  Value out(rapidjson::kObjectType);
  auto thinking = m->FindMember("thinking");
  out.AddMember("thinking", thinking != m->MemberEnd() ? Value(thinking->value, a) : Value(reasoning, a), a);
  bool have_rc = false;
  for (auto it = m->MemberBegin(); it != m->MemberEnd(); ++it) {
    std::string_view k(it->name.GetString(), it->name.GetStringLength());
    if (k == "thinking") continue;
    if (k == "reasoning_content") {
      out.AddMember(Value(it->name, a), Value(reasoning, a), a);
      have_rc = true;
    } else {
      out.AddMember(Value(it->name, a), Value(it->value, a), a);
    }
  }
  if (!have_rc) out.AddMember("reasoning_content", reasoning, a);
  *m = out;
}

// One message as the template sees it. Plain messages reference their strings (no copy).
Value message_value(const Message& m, rapidjson::Document::AllocatorType& a, size_t i) {
  auto str = [&](const std::string& s) {
    if (unicode::is_valid_utf8(s)) return Value(rapidjson::StringRef(s.data(), s.size()));
    return Value(unicode::to_valid_utf8(s).c_str(), a);
  };
  if (m.json.empty()) {
    Value v(rapidjson::kObjectType);
    v.AddMember("role", str(m.role), a);
    v.AddMember("content", str(m.content), a);
    return v;
  }
  rapidjson::Document parsed = json::parse(m.json, "messages[" + std::to_string(i) + "]");
  if (!parsed.IsObject()) throw Error("messages[" + std::to_string(i) + "]: Message::json is not a JSON object");
  Value v(parsed, a);
  auto c = v.FindMember("content");
  if (c != v.MemberEnd() && c->value.IsString()) c->value = str(m.content);
  alias_reasoning(&v, a);
  return v;
}

// The context apply_chat_template renders with, "messages" left empty for the caller to fill.
rapidjson::Document base_context(const Tokenizer::Impl& im, bool add_generation_prompt, const ChatExtras& extras) {
  rapidjson::Document c(rapidjson::kObjectType);
  auto& a = c.GetAllocator();
  c.AddMember("messages", Value(rapidjson::kArrayType), a);
  if (extras.tools.empty()) {
    c.AddMember("tools", Value(), a);
  } else {
    rapidjson::Document t = json::parse(extras.tools, "tools");
    c.AddMember("tools", Value(t, a), a);
  }
  c.AddMember("documents", Value(), a);
  c.AddMember("add_generation_prompt", add_generation_prompt, a);
  auto merge = [&](const Value& obj) {
    for (auto it = obj.MemberBegin(); it != obj.MemberEnd(); ++it) {
      refuse_fixed_key(it->name.GetString(), "chat_template_kwargs");
      auto have = c.FindMember(it->name);
      if (have != c.MemberEnd()) {
        have->value.CopyFrom(it->value, a);
      } else {
        c.AddMember(Value(it->name, a), Value(it->value, a), a);
      }
    }
  };
  if (im.chat_globals.IsObject()) merge(im.chat_globals);
  if (!extras.kwargs.empty()) {
    rapidjson::Document k = json::parse(extras.kwargs, "chat_template_kwargs");
    if (k.IsObject()) merge(k);
  }
  return c;
}

const jinja::Template& pick_template(const Tokenizer& tok, const ChatExtras& extras) {
  tok.chat_template();  // throws ChatTemplateError when there is none
  const Tokenizer::Impl& im = tok.impl();
  // transformers' get_chat_template: a "tool_use" template (list form) when tools are given.
  if (!extras.tools.empty() && im.chat_tmpl_tools) return *im.chat_tmpl_tools;
  return *im.chat_tmpl;
}

void check_roles(const std::vector<Message>& messages) {
  if (messages.empty())
    throw Error("chat: a conversation needs at least one message (apply_chat_template refuses an empty one)");
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& r = messages[i].role;
    if (r != "system" && r != "user" && r != "assistant" && r != "tool")
      throw Error("chat: message " + std::to_string(i) + " has role `" + r +
                  "`\n---> HINT: roles are system, user, assistant and tool");
  }
}

// Length of the longest suffix of `d` that is a prefix of `t` (Knuth-Morris-Pratt over t).
size_t longest_suffix_prefix(std::string_view d, std::string_view t) {
  if (t.size() > d.size()) t = t.substr(0, d.size());
  if (t.empty()) return 0;
  std::vector<size_t> fail(t.size(), 0);
  for (size_t i = 1, k = 0; i < t.size(); ++i) {
    while (k > 0 && t[i] != t[k]) k = fail[k - 1];
    if (t[i] == t[k]) ++k;
    fail[i] = k;
  }
  size_t k = 0;
  for (char ch : d) {
    while (k > 0 && (k == t.size() || ch != t[k])) k = fail[k - 1];
    if (ch == t[k]) ++k;
  }
  return k;
}

bool is_space(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r' || c == '\f' || c == '\v'; }

// [b, e) less the whitespace after its last added token, when only whitespace follows that token.
size_t trim_after_added(const Tokenizer::Impl& im, const std::string& text, size_t b, size_t e) {
  size_t w = e;
  while (w > b && is_space(text[w - 1])) --w;
  if (w == e) return e;
  std::string_view before(text.data() + b, w - b);
  for (const auto& t : im.added)
    if (!t.content.empty() && before.size() >= t.content.size() &&
        before.compare(before.size() - t.content.size(), t.content.size(), t.content) == 0)
      return w;
  return e;
}

struct Rendered {
  std::string text;
  std::vector<std::pair<size_t, size_t>> spans;  // assistant spans, in order
};

Rendered render(const Tokenizer& tok, const std::vector<Message>& messages, bool add_generation_prompt,
                const ChatExtras& extras, bool with_spans) {
  const jinja::Template& tmpl = pick_template(tok, extras);
  const Tokenizer::Impl& im = tok.impl();
  check_roles(messages);
  rapidjson::Document c = base_context(im, add_generation_prompt, extras);
  auto& a = c.GetAllocator();
  Value& list = c["messages"];
  list.Reserve(static_cast<rapidjson::SizeType>(messages.size()), a);
  Rendered out;
  if (!with_spans || tmpl.has_generation_blocks()) {
    for (size_t i = 0; i < messages.size(); ++i) list.PushBack(message_value(messages[i], a, i), a);
    jinja::Rendering r = tmpl.render(c);
    out.text = std::move(r.text);
    out.spans = std::move(r.generation);
    return out;
  }
  // Per assistant turn: G (the conversation before it, with the generation prompt) and F (up to and
  // including it); the whole rendering H comes last, so the prefixes are checked against it after.
  struct Turn {
    size_t index, g;
    std::string d;
  };
  std::vector<Turn> turns;
  std::vector<std::string> g_texts;
  for (size_t i = 0; i < messages.size(); ++i) {
    if (messages[i].role == "assistant") {
      c["add_generation_prompt"].SetBool(true);
      std::string g, f;
      try {
        g = tmpl.render(c).text;
      } catch (const Error& e) {
        throw Error(at_message(i, "assistant") + ": the chat template cannot render the conversation before this turn "
                    "with the generation prompt, which the turn's assistant mask is measured from: " + e.what());
      }
      list.PushBack(message_value(messages[i], a, i), a);
      c["add_generation_prompt"].SetBool(false);
      f = tmpl.render(c).text;
      if (f.compare(0, g.size(), g) != 0 || f.size() < g.size())
        throw Error(at_message(i, "assistant") + ": the chat template renders the conversation up to this turn so that "
                    "it does not start with the rendering before it plus the generation prompt, so the turn's tokens "
                    "cannot be found (no assistant mask)");
      turns.push_back({i, g.size(), f.substr(g.size())});
      g_texts.push_back(std::move(g));
    } else {
      list.PushBack(message_value(messages[i], a, i), a);
    }
  }
  c["add_generation_prompt"].SetBool(add_generation_prompt);
  out.text = tmpl.render(c).text;
  const std::string& h = out.text;
  for (size_t k = 0; k < turns.size(); ++k) {
    const Turn& t = turns[k];
    if (h.size() < t.g || h.compare(0, t.g, g_texts[k]) != 0)
      throw Error(at_message(t.index, "assistant") + ": the chat template renders the whole conversation so that it "
                  "does not start with the rendering before this turn plus the generation prompt, so the turn's "
                  "tokens cannot be found (no assistant mask)");
    size_t len = longest_suffix_prefix(t.d, std::string_view(h).substr(t.g));
    size_t e = trim_after_added(im, h, t.g, t.g + len);
    if (e == t.g)
      throw Error(at_message(t.index, "assistant") + ": the chat template keeps nothing of this turn in the whole "
                  "conversation's rendering, so nothing of it can be trained");
    out.spans.emplace_back(t.g, e);
  }
  return out;
}

}  // namespace

std::string Tokenizer::render_chat_text(const std::vector<Message>& messages, bool add_generation_prompt,
                                        const ChatExtras& extras) const {
  return render(*this, messages, add_generation_prompt, extras, false).text;
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
        out.push_back({m.role, std::string(utf8_head(m.content, bytes - total)), m.json});
      }
      total += out.back().content.size();
    }
  }
  return out;
}

ChatEncoding Tokenizer::render_chat(const std::vector<Message>& messages, bool add_generation_prompt,
                                    size_t max_ids, const ChatExtras& extras) const {
  Rendered r = render(*this, messages, add_generation_prompt, extras, true);
  Impl::Tail whole = impl_->bounded();  // a huge pre-token merged a window at a time
  Impl::Tail* bounded = nullptr;
  std::string_view text = r.text;
  if (max_ids != SIZE_MAX) {
    bounded = &whole;
    text = utf8_head(text, head_bytes(max_ids));
  }
  ChatEncoding out;
  std::vector<uint32_t> starts;
  out.ids.reserve(text.size() / 3 + 4);
  starts.reserve(text.size() / 3 + 4);
  impl_->encode_into(text, &out.ids, &starts, bounded);
  out.assistant_mask.assign(out.ids.size(), 0);
  // A token is masked in when it overlaps an assistant span, as HF's return_assistant_tokens_mask
  // does (a token that starts before a span and reaches into it is in).
  size_t span = 0;
  for (size_t i = 0; i < out.ids.size(); ++i) {
    size_t b = starts[i];
    size_t e = i + 1 < out.ids.size() ? std::max<size_t>(starts[i + 1], b + 1) : text.size();
    while (span < r.spans.size() && b >= r.spans[span].second) ++span;
    if (span == r.spans.size()) break;
    if (e > r.spans[span].first) out.assistant_mask[i] = 1;
  }
  if (out.ids.size() > max_ids) {
    out.ids.resize(max_ids);
    out.assistant_mask.resize(max_ids);
  }
  out.text = std::move(r.text);
  return out;
}

}  // namespace ptk::tokenizer
