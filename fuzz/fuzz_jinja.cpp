// libFuzzer: ptk's chat-template interpreter (core/tokenizer/jinja.cpp) on arbitrary templates, the
// thing users download with a model folder. The input is the template; it is rendered against a fixed
// conversation (system, user, assistant with reasoning and tool calls, tool result, tools list).
// Checks: no crash, no sanitizer report, no stack overflow (nesting and recursion are bounded), and
// only ptk::Error thrown. Run with fuzz/jinja.dict and fuzz/corpus/jinja (seeded with TRL's templates:
// copy .venv/lib/python3.11/site-packages/trl/chat_templates/*.jinja there first).
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "core/tokenizer/jinja.h"
#include "core/util/error.h"
#include "core/util/json.h"

namespace {

const char* const kContext = R"({
  "messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris? caf\u00e9 \ud83d\ude00"},
    {"role": "assistant", "content": "<think>hm</think>Checking.", "reasoning_content": "hm",
     "tool_calls": [{"id": "call_123456789", "type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2, "x": 1.5}}}]},
    {"role": "tool", "content": "21", "name": "get_weather", "tool_call_id": "call_123456789"},
    {"role": "assistant", "content": [{"type": "text", "text": "21 C."}]}
  ],
  "tools": [{"type": "function", "function": {"name": "get_weather", "description": "d",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
  "documents": null, "add_generation_prompt": true, "enable_thinking": false,
  "bos_token": "<s>", "eos_token": "</s>"
})";

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const rapidjson::Document ctx = ptk::json::parse(kContext, "fuzz context");
  std::string_view source(reinterpret_cast<const char*>(data), size);
  try {
    ptk::jinja::Template t = ptk::jinja::Template::parse(source, "fuzz");
    ptk::jinja::Rendering r = t.render(ctx);
    for (const auto& g : r.generation)
      if (g.first >= g.second || g.second > r.text.size()) std::abort();
  } catch (const ptk::Error&) {
  }
  return 0;
}
