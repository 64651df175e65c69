// token_bytes_table: GPT-2's byte-to-unicode alphabet inverted over the tokenizer's vocabulary
// forms. Not the tokenizer's own decode (that one also repairs invalid UTF-8 across tokens).
#include "rollout/token_bytes.h"

#include <array>
#include <cstdint>
#include <unordered_map>

#include "core/tokenizer/tokenizer.h"

namespace ptk::rollout {
namespace {

// GPT-2 bytes_to_unicode, inverted: code point -> byte.
std::unordered_map<uint32_t, uint8_t> unicode_to_byte() {
  std::unordered_map<uint32_t, uint8_t> m;
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    m[printable ? b : next++] = static_cast<uint8_t>(b);
  }
  return m;
}

// One code point of valid UTF-8 at s[i]; returns its length, 0 when invalid.
size_t utf8_next(const std::string& s, size_t i, uint32_t* cp) {
  const auto c = static_cast<unsigned char>(s[i]);
  size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
  if (n == 0 || i + n > s.size()) return 0;
  uint32_t v = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
  for (size_t k = 1; k < n; ++k) {
    const auto d = static_cast<unsigned char>(s[i + k]);
    if ((d >> 6) != 2) return 0;
    v = (v << 6) | (d & 0x3F);
  }
  *cp = v;
  return n;
}

}  // namespace

std::shared_ptr<const std::vector<std::string>> token_bytes_table(const tokenizer::Tokenizer& tok) {
  static const auto alphabet = unicode_to_byte();
  auto table = std::make_shared<std::vector<std::string>>(tok.vocab_size());
  for (size_t id = 0; id < table->size(); ++id) {
    const std::string form = tok.id_to_token(static_cast<tokenizer::TokenId>(id));
    std::string bytes;
    bool all_in_alphabet = true;
    for (size_t i = 0; i < form.size();) {
      uint32_t cp = 0;
      const size_t n = utf8_next(form, i, &cp);
      auto it = n ? alphabet.find(cp) : alphabet.end();
      if (it == alphabet.end()) {
        all_in_alphabet = false;
        break;
      }
      bytes.push_back(static_cast<char>(it->second));
      i += n;
    }
    // HF's ByteLevel decoder: a token not made of the byte alphabet decodes to its own UTF-8.
    (*table)[id] = all_in_alphabet ? bytes : form;
  }
  return table;
}

}  // namespace ptk::rollout
