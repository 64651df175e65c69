// Internal to core/tokenizer: the Split pre-tokenizer (HF `Split` with behavior Isolated, or
// ByteLevel's use_regex) through PCRE2 with JIT. Not a general regex wrapper.
#pragma once
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace ptk::tokenizer {

// GPT-2's pattern, what HF's ByteLevel pre-tokenizer uses when use_regex is true.
extern const char* const kGpt2Pattern;

class RegexSplitter {
 public:
  // `pattern` in HF's (Oniguruma) syntax; `\s`/`\S` are rewritten to Unicode White_Space classes so
  // PCRE2 matches what Oniguruma matches. Throws ptk::Error naming `where` when it does not compile.
  RegexSplitter(const std::string& pattern, const std::string& where);
  ~RegexSplitter();
  RegexSplitter(const RegexSplitter&) = delete;
  RegexSplitter& operator=(const RegexSplitter&) = delete;

  // Calls f(begin, end) for every piece of `text` (valid UTF-8) in order: each match, and each gap
  // between matches (HF's Isolated behavior). Thread-safe (per-thread match data and JIT stack).
  template <class F>
  void split(std::string_view text, F&& f) const {
    size_t pos = 0, last = 0;
    size_t mb, me;
    while (pos < text.size() && next_match(text, pos, &mb, &me)) {
      if (mb > last) f(last, mb);
      f(mb, me);
      last = me;
      pos = me;
    }
    if (last < text.size()) f(last, text.size());
  }

  // PCRE2 translation of the HF pattern (for tests and error messages).
  const std::string& translated() const { return translated_; }

 private:
  // Finds the first non-empty match at or after `pos`; false when none.
  bool next_match(std::string_view text, size_t pos, size_t* b, size_t* e) const;
  void* code_ = nullptr;  // pcre2_code*
  std::string translated_;
};

// Rewrites `\s` and `\S` (outside and inside classes) to explicit White_Space sets.
std::string translate_hf_regex(const std::string& pattern);

}  // namespace ptk::tokenizer
