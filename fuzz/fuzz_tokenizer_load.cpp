// libFuzzer: the tokenizer.json loader on arbitrary bytes (seeded with tests/tokenizer/data's small
// files). Checks: it either loads or throws ptk::Error, never crashes; a loaded tokenizer encodes,
// decodes and renders chat without crashing. Not a check of ids (the golden tests do that).
#include <string>

#include "core/tokenizer/tokenizer.h"
#include "core/util/error.h"

using namespace ptk::tokenizer;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string s(reinterpret_cast<const char*>(data), size);
  try {
    Tokenizer t = Tokenizer::from_json(s, "", "fuzz.json", {ChatTemplate::kChatML});
    for (const char* text : {"hello world <mask> [SW] abc", "e\xcc\x81! \xe4\xbd\xa0\xff<|end|>x  y", ""}) {
      auto ids = t.encode(text);
      (void)t.decode(ids, false);
      (void)t.decode(ids, true);
    }
    (void)t.render_chat({{"user", "hi"}, {"assistant", "ok"}}, true);
    (void)t.encode_prompt_completion("a", "b", t.eos_id() != kNoToken);
  } catch (const ptk::Error&) {
  }
  return 0;
}
