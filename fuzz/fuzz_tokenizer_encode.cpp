// libFuzzer: encode/decode of arbitrary bytes with Qwen's tokenizer (or $PTK_FUZZ_TOKENIZER).
// Checks: no crash; decode(encode(x)) == NFC(x with invalid UTF-8 repaired); the NFC fast path
// agrees with utf8proc; batch == serial. Not a speed test.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/tokenizer/tokenizer.h"
#include "core/tokenizer/unicode.h"
#include "core/util/fs.h"

using namespace ptk::tokenizer;

static const Tokenizer& tok() {
  static Tokenizer* t = [] {
    const char* env = std::getenv("PTK_FUZZ_TOKENIZER");
    std::string root = PTK_SOURCE_DIR_DEFAULT;
    std::string p = env ? env : root + "/assets/tokenizers/qwen/tokenizer.json";
    if (!ptk::path_exists(p)) p = root + "/../shared/tokenizers/qwen/tokenizer.json";
    return new Tokenizer(Tokenizer::load(p));
  }();
  return *t;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string s(reinterpret_cast<const char*>(data), size);
  const Tokenizer& t = tok();
  std::vector<TokenId> ids = t.encode(s);
  std::string valid = to_valid_utf8(s);
  std::string expect = unicode::nfc_slow(valid);
  if (unicode::nfc_quick_yes(valid) && expect != valid) {
    std::fprintf(stderr, "NFC quick check said yes but NFC changes the text\n");
    std::abort();
  }
  if (t.decode(ids) != expect) {
    std::fprintf(stderr, "decode(encode(x)) != NFC(x)\n");
    std::abort();
  }
  if (size % 7 == 0) {
    auto batch = t.encode_batch({s, valid, s}, 2);
    if (batch[0] != ids || batch[1] != ids || batch[2] != ids) std::abort();
  }
  return 0;
}
