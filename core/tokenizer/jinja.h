// A Jinja2 subset interpreter for chat templates: renders a tokenizer_config.json `chat_template`
// exactly as transformers' apply_chat_template renders it (jinja2's ImmutableSandboxedEnvironment
// with trim_blocks=True, lstrip_blocks=True, the loopcontrols extension, transformers' tojson,
// raise_exception, strftime_now, and the {% generation %} / {% endgeneration %} tag whose spans give
// assistant masks). Not a general Jinja engine: no template inheritance, includes or autoescape;
// syntax or a filter outside the subset is refused at parse time (or at render time, for a name only
// known then) with the template's line and column.
//
// Threading: a parsed Template is immutable; render() may be called from many threads at once.
#pragma once
#include <rapidjson/document.h>

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ptk::jinja {

struct Rendering {
  std::string text;
  // Byte ranges [begin, end) of `text` written inside {% generation %} ... {% endgeneration %}
  // blocks, in order (empty ranges dropped). Empty when the template has no such block.
  std::vector<std::pair<size_t, size_t>> generation;
};

class Template {
 public:
  // Parses `source`. `origin` names the template in error messages ("<origin>:LINE:COL: ...").
  // Throws ptk::Error for a syntax error or a construct outside the subset.
  static Template parse(std::string_view source, const std::string& origin = "chat_template");

  Template(Template&&) noexcept;
  Template& operator=(Template&&) noexcept;
  ~Template();

  // Renders with the top-level variables of `context`, a JSON object, e.g.
  //   {"messages": [{"role": "user", "content": "hi"}], "tools": [...], "add_generation_prompt": true,
  //    "bos_token": "", "eos_token": "<|im_end|>", "enable_thinking": false}
  // JSON values keep their kinds as Python's json.loads gives them (int vs float, key order), so
  // `x | tojson` prints what Python's json.dumps prints. Throws ptk::Error for raise_exception(msg)
  // (the message is msg) and for runtime errors (unknown filter, calling a non-callable, ...), naming
  // the template's line.
  Rendering render(const rapidjson::Value& context) const;
  // The same, from the JSON text of the context object.
  Rendering render(std::string_view context_json) const;

  // Whether the template contains a {% generation %} block.
  bool has_generation_blocks() const;
  const std::string& source() const;

  struct Impl;

 private:
  explicit Template(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ptk::jinja
