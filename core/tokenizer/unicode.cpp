// UTF-8, NFC and byte-level alphabet helpers for the tokenizer (see unicode.h).
// Not a general Unicode library: only what HF's tokenizer pipeline needs.
#include "core/tokenizer/unicode.h"

#include <utf8proc.h>

#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

#include "core/util/error.h"

namespace ptk::tokenizer::unicode {

size_t decode(std::string_view s, size_t i, uint32_t* cp) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data()) + i;
  size_t n = s.size() - i;
  unsigned char c = p[0];
  if (c < 0x80) {
    *cp = c;
    return 1;
  }
  if (c < 0xC2) return 0;
  if (c < 0xE0) {
    if (n < 2 || (p[1] & 0xC0) != 0x80) return 0;
    *cp = ((c & 0x1Fu) << 6) | (p[1] & 0x3Fu);
    return 2;
  }
  if (c < 0xF0) {
    if (n < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80) return 0;
    if (c == 0xE0 && p[1] < 0xA0) return 0;   // overlong
    if (c == 0xED && p[1] >= 0xA0) return 0;  // surrogate
    *cp = ((c & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3Fu);
    return 3;
  }
  if (c < 0xF5) {
    if (n < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80) return 0;
    if (c == 0xF0 && p[1] < 0x90) return 0;   // overlong
    if (c == 0xF4 && p[1] >= 0x90) return 0;  // > U+10FFFF
    *cp = ((c & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12) | ((p[2] & 0x3Fu) << 6) | (p[3] & 0x3Fu);
    return 4;
  }
  return 0;
}

void append(std::string* out, uint32_t cp) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

bool is_ascii(std::string_view s) {
  size_t i = 0, n = s.size();
  const char* p = s.data();
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    __builtin_memcpy(&w, p + i, 8);
    if (w & 0x8080808080808080ull) return false;
  }
  for (; i < n; ++i)
    if (static_cast<unsigned char>(p[i]) >= 0x80) return false;
  return true;
}

bool is_valid_utf8(std::string_view s) {
  size_t i = 0;
  uint32_t cp;
  while (i < s.size()) {
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    size_t n = decode(s, i, &cp);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

// Length of the maximal subpart of an ill-formed sequence starting at i (Unicode ch. 3, U+FFFD
// substitution of maximal subparts): the longest prefix of a valid sequence, at least 1 byte.
static size_t maximal_subpart(std::string_view s, size_t i) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data()) + i;
  size_t n = s.size() - i;
  unsigned char c = p[0];
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c < 0xE0) {
    need = 2;
  } else if (c >= 0xE0 && c < 0xF0) {
    need = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c < 0xF5) {
    need = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 1;
  }
  size_t k = 1;
  if (k < n && p[k] >= lo && p[k] <= hi) {
    ++k;
    while (k < need && k < n && (p[k] & 0xC0) == 0x80) ++k;
  }
  return k;
}

std::string to_valid_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 8);
  size_t i = 0;
  uint32_t cp;
  while (i < s.size()) {
    size_t n = decode(s, i, &cp);
    if (n) {
      out.append(s.data() + i, n);
      i += n;
    } else {
      out.append("\xEF\xBF\xBD");
      i += maximal_subpart(s, i);
    }
  }
  return out;
}

// One bit per code point: 1 when the character is an NFC-stable starter that never takes part in
// composition as a second element (so a string made of such characters is already NFC).
namespace {
struct QuickTable {
  std::vector<uint64_t> bits;
  QuickTable() : bits((0x110000 + 63) / 64, 0) {
    for (uint32_t c = 0; c < 0x110000; ++c) {
      if (c >= 0xD800 && c < 0xE000) continue;
      const utf8proc_property_t* p = utf8proc_get_property(static_cast<utf8proc_int32_t>(c));
      if (p->combining_class != 0) continue;
      if (p->comb_index != 0xFFFF && (p->comb_index & 0x8000)) continue;  // second of a pair
      if (c >= 0x1100 && c < 0x1200) continue;                            // Hangul jamo (algorithmic)
      if (p->decomp_seqindex != 0xFFFF && p->decomp_type == 0) {          // canonical decomposition
        std::string one;
        append(&one, c);
        if (nfc_slow(one) != one) continue;
      }
      bits[c >> 6] |= 1ull << (c & 63);
    }
  }
  bool safe(uint32_t c) const { return (bits[c >> 6] >> (c & 63)) & 1; }
};
const QuickTable& quick_table() {
  static const QuickTable t;
  return t;
}
}  // namespace

bool nfc_quick_yes(std::string_view s) {
  if (is_ascii(s)) return true;
  const QuickTable& t = quick_table();
  size_t i = 0;
  uint32_t cp;
  while (i < s.size()) {
    size_t n = decode(s, i, &cp);
    if (n == 0 || !t.safe(cp)) return false;
    i += n;
  }
  return true;
}

std::string nfc_slow(std::string_view s) {
  utf8proc_uint8_t* out = nullptr;
  utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                    static_cast<utf8proc_ssize_t>(s.size()), &out,
                                    static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  if (n < 0) {
    std::free(out);
    throw Error(std::string("NFC normalization failed: ") + utf8proc_errmsg(n) +
                " (the tokenizer validates UTF-8 first; this is a bug, please report it)");
  }
  std::string r(reinterpret_cast<char*>(out), static_cast<size_t>(n));
  std::free(out);
  return r;
}

std::string nfc(std::string_view s) {
  if (nfc_quick_yes(s)) return std::string(s);
  return nfc_slow(s);
}

bool is_whitespace(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

bool is_word_char(uint32_t c) {
  if (c < 0x80) return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  if (c == 0x200C || c == 0x200D) return true;
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_MC: case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_PC:
      return true;
    default:
      return false;
  }
}

namespace {
struct ByteAlphabet {
  uint32_t to_cp[256];
  ByteAlphabet() {
    // GPT-2: printable Latin-1 bytes map to themselves, the rest to U+0100 upwards in byte order.
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      bool keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      to_cp[b] = keep ? static_cast<uint32_t>(b) : next++;
    }
  }
};
const ByteAlphabet kAlphabet;
}  // namespace

uint32_t byte_to_cp(uint8_t b) { return kAlphabet.to_cp[b]; }

int cp_to_byte(uint32_t cp) {
  if (cp < 256) {
    if (kAlphabet.to_cp[cp] == cp) return static_cast<int>(cp);
    return -1;
  }
  if (cp < 256 + 68) {
    for (int b = 0; b < 256; ++b)
      if (kAlphabet.to_cp[b] == cp) return b;
  }
  return -1;
}

}  // namespace ptk::tokenizer::unicode
