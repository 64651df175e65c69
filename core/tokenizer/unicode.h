// Internal to core/tokenizer: UTF-8 validation and repair, NFC normalization, GPT-2's byte-to-unicode
// alphabet, and the few Unicode classes HF's added-token matching uses. Not a public API.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace ptk::tokenizer::unicode {

// Decodes one code point at `s[i]`; returns its length in bytes, or 0 when the bytes there are not
// valid UTF-8 (overlong, surrogate, > U+10FFFF, truncated).
size_t decode(std::string_view s, size_t i, uint32_t* cp);
void append(std::string* out, uint32_t cp);

bool is_valid_utf8(std::string_view s);
// Invalid sequences replaced by U+FFFD, one per maximal subpart (what Rust's from_utf8_lossy,
// Python's errors="replace" and WHATWG's TextDecoder do).
std::string to_valid_utf8(std::string_view s);

bool is_ascii(std::string_view s);
// NFC of valid UTF-8. Fast path: text made only of characters that are NFC-stable starters
// (never recomposed, reordered or changed) is returned as is without calling utf8proc.
std::string nfc(std::string_view s);
// True when nfc(s) == s is known without normalizing (the fast path above).
bool nfc_quick_yes(std::string_view s);
// utf8proc's NFC without the fast path (the fuzz harness checks both agree).
std::string nfc_slow(std::string_view s);

// HF's `\s` (Unicode White_Space) and `\w` (alphabetic, marks, decimal digits, connector punctuation,
// join controls) for one code point.
bool is_whitespace(uint32_t cp);
bool is_word_char(uint32_t cp);

// GPT-2 byte-level alphabet: byte -> code point and back (-1 for code points outside it).
uint32_t byte_to_cp(uint8_t b);
int cp_to_byte(uint32_t cp);

}  // namespace ptk::tokenizer::unicode
