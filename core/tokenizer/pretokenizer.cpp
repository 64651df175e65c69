// PCRE2-JIT implementation of HF's regex Split pre-tokenizer (see pretokenizer.h).
// Not a matcher for any other HF pre-tokenizer type: tokenizer.cpp refuses those.
#define PCRE2_CODE_UNIT_WIDTH 8
#include "core/tokenizer/pretokenizer.h"

#include <pcre2.h>

#include "core/util/error.h"

namespace ptk::tokenizer {

const char* const kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

namespace {
// Oniguruma's \s (Unicode White_Space); PCRE2's \s in UCP mode differs (it lacks U+0085).
const char* const kSpaceSet = R"(\t-\r\x{20}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000})";

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof buf);
  return reinterpret_cast<char*>(buf);
}

// Per-thread match state, shared by every pattern (the ovector holds one pair).
struct ThreadState {
  pcre2_match_data* md = nullptr;
  pcre2_match_context* mc = nullptr;
  pcre2_jit_stack* stack = nullptr;
  ThreadState() {
    md = pcre2_match_data_create(1, nullptr);
    mc = pcre2_match_context_create(nullptr);
    // Long whitespace runs backtrack through `\s+(?!\S)`: give JIT room (reserved, grown on use).
    stack = pcre2_jit_stack_create(64 * 1024, 128 * 1024 * 1024, nullptr);
    pcre2_jit_stack_assign(mc, nullptr, stack);
  }
  ~ThreadState() {
    pcre2_match_data_free(md);
    pcre2_match_context_free(mc);
    pcre2_jit_stack_free(stack);
  }
};
ThreadState& thread_state() {
  thread_local ThreadState s;
  return s;
}
}  // namespace

std::string translate_hf_regex(const std::string& p) {
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < p.size(); ++i) {
    char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      char d = p[i + 1];
      if (d == 's') {
        out += in_class ? std::string(kSpaceSet) : "[" + std::string(kSpaceSet) + "]";
      } else if (d == 'S') {
        if (in_class)
          throw Error("pre-tokenizer regex uses \\S inside a character class, which ptk cannot translate: " + p +
                      "\n---> HINT: this tokenizer.json is not supported; please report it with the file");
        out += "[^" + std::string(kSpaceSet) + "]";
      } else {
        out += c;
        out += d;
      }
      ++i;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      if (i + 1 < p.size() && p[i + 1] == '^') out += p[++i];
      if (i + 1 < p.size() && p[i + 1] == ']') out += p[++i];  // literal ] first in a class
      continue;
    }
    if (in_class && c == ']') in_class = false;
    out += c;
  }
  return out;
}

RegexSplitter::RegexSplitter(const std::string& pattern, const std::string& where)
    : translated_(translate_hf_regex(pattern)) {
  int err = 0;
  PCRE2_SIZE off = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated_.data()), translated_.size(),
                                   PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &err, &off, nullptr);
  if (!code)
    throw Error(where + ": pre-tokenizer regex does not compile (" + pcre2_message(err) + " at offset " +
                std::to_string(off) + " of `" + translated_ + "`)\n---> HINT: ptk supports HF Split regexes " +
                "that PCRE2 accepts; check the pattern in tokenizer.json");
  int jit = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  if (jit != 0) {
    pcre2_code_free(code);
    throw Error(where + ": PCRE2 JIT is unavailable (" + pcre2_message(jit) +
                ")\n---> HINT: install a libpcre2-8 built with JIT (Debian's is)");
  }
  code_ = code;
}

RegexSplitter::~RegexSplitter() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

bool RegexSplitter::next_match(std::string_view text, size_t pos, size_t* b, size_t* e) const {
  ThreadState& ts = thread_state();
  uint32_t opts = 0;
  for (;;) {
    int rc = pcre2_jit_match(static_cast<pcre2_code*>(code_), reinterpret_cast<PCRE2_SPTR>(text.data()),
                             text.size(), pos, opts, ts.md, ts.mc);
    if (rc == PCRE2_ERROR_NOMATCH) return false;
    if (rc < 0)
      throw Error("pre-tokenizer regex failed at byte " + std::to_string(pos) + " of a " +
                  std::to_string(text.size()) + "-byte text: " + pcre2_message(rc) +
                  "\n---> HINT: split the text into smaller records (a single whitespace run this long "
                  "exhausts the regex stack)");
    PCRE2_SIZE* ov = pcre2_get_ovector_pointer(ts.md);
    if (ov[1] > ov[0]) {
      *b = ov[0];
      *e = ov[1];
      return true;
    }
    // Empty match: HF skips it (it yields no piece); retry from the next character.
    pos = ov[0] + 1;
    while (pos < text.size() && (static_cast<unsigned char>(text[pos]) & 0xC0) == 0x80) ++pos;
    if (pos >= text.size()) return false;
  }
}

}  // namespace ptk::tokenizer
