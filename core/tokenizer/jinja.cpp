// The Jinja2 subset interpreter for chat templates (see jinja.h): a lexer that applies jinja2's
// whitespace rules (trim_blocks, lstrip_blocks, "-" and "+" markers), a recursive-descent parser to
// an immutable tree, and a tree-walking renderer over values that reference the caller's RapidJSON
// context in place (strings are views into it or into shared buffers; nothing is copied per render).
//
// Semantics follow jinja2 3.1 in transformers' environment: Python truthiness, str() / repr() of
// values, Python float repr, json.dumps for tojson, undefined values (printing gives "", attribute
// of an undefined is an error), per-iteration loop scopes, namespace(), macros and call blocks.
//
// Limits against hostile templates (they come from downloaded model folders): parser nesting depth,
// macro recursion depth, total loop iterations, range() size (jinja2's sandbox: 100000) and output
// size, each with a clear error naming the template position.
#include "core/tokenizer/jinja.h"

#include <utf8proc.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/util/error.h"
#include "core/util/json.h"

namespace ptk::jinja {

namespace {

constexpr int kMaxParseDepth = 200;            // nested expressions / blocks in the source
constexpr int kMaxCallDepth = 100;              // nested macro / caller invocations
// Nested evaluations (expressions and statement bodies, across macro calls) of one rendering: bounds
// the interpreter's stack at about 1 MiB (a frame of eval is about 1.4 KB in a Release build).
constexpr int kMaxEvalDepth = 600;
constexpr int64_t kMaxLoopIterations = 10000000;  // all loops of one render together
constexpr int64_t kMaxRange = 100000;           // jinja2's sandbox MAX_RANGE
constexpr size_t kMaxOutputBytes = size_t(64) << 20;  // any string built while rendering (and the output)
constexpr size_t kMaxListItems = 10'000'000;           // a list built by + (as `*` is capped)

// Whether a double converts to int64 without undefined behaviour (Python's int() would give a big
// integer here; ptk's integers are 64-bit, so such a value is an error rather than a wrapped number).
bool fits_int64(double d) { return d >= -9223372036854775808.0 && d < 9223372036854775808.0; }

// ---------------------------------------------------------------------------------------------
// Values

enum class K : uint8_t { Undef, None, Bool, Int, Float, Str, List, Dict, JArr, JObj, NS, Func, Loop };

struct Obj {
  virtual ~Obj() = default;
};
struct StrObj : Obj {
  std::string s;
  explicit StrObj(std::string x) : s(std::move(x)) {}
};

struct Value;
using Args = std::vector<Value>;

struct Value {
  K k = K::Undef;
  bool markup = false;   // jinja2 Markup (from |safe): `+` escapes the other operand
  uint8_t undef_kind = 0;  // Undef: 0 "'s' is undefined", 1 "'<type> object' has no attribute 's'"
  union {
    bool b;
    int64_t i;
    double d;
    const rapidjson::Value* j;
  } u{};
  std::string_view s;      // Str: the text; Undef: the name
  std::shared_ptr<Obj> o;  // owner of Str text, List, Dict, NS, Func, Loop

  static Value undef(std::string_view name = {}, uint8_t kind = 0, int type_code = 0) {
    Value v;
    v.s = name;
    v.undef_kind = kind;
    v.u.i = type_code;
    return v;
  }
  static Value none() {
    Value v;
    v.k = K::None;
    return v;
  }
  static Value boolean(bool b) {
    Value v;
    v.k = K::Bool;
    v.u.b = b;
    return v;
  }
  static Value integer(int64_t i) {
    Value v;
    v.k = K::Int;
    v.u.i = i;
    return v;
  }
  static Value flt(double d) {
    Value v;
    v.k = K::Float;
    v.u.d = d;
    return v;
  }
  static Value view(std::string_view s, std::shared_ptr<Obj> owner = nullptr) {
    Value v;
    v.k = K::Str;
    v.s = s;
    v.o = std::move(owner);
    return v;
  }
  static Value str(std::string s) {
    auto o = std::make_shared<StrObj>(std::move(s));
    Value v;
    v.k = K::Str;
    v.s = o->s;
    v.o = std::move(o);
    return v;
  }
  static Value json(const rapidjson::Value& j);

  bool is_undef() const { return k == K::Undef; }
  bool is_str() const { return k == K::Str; }
  bool is_num() const { return k == K::Int || k == K::Float || k == K::Bool; }
  bool is_list() const { return k == K::List || k == K::JArr; }
  bool is_dict() const { return k == K::Dict || k == K::JObj; }
};

struct ListObj : Obj {
  std::vector<Value> v;
  bool tuple = false;
};
struct DictObj : Obj {
  std::vector<std::pair<Value, Value>> v;  // keys are strings (the only kind JSON and templates use)
  const Value* find(std::string_view key) const {
    for (const auto& kv : v)
      if (kv.first.s == key) return &kv.second;
    return nullptr;
  }
  void set(Value key, Value val) {
    for (auto& kv : v)
      if (kv.first.s == key.s) {
        kv.second = std::move(val);
        return;
      }
    v.emplace_back(std::move(key), std::move(val));
  }
};

Value Value::json(const rapidjson::Value& j) {
  switch (j.GetType()) {
    case rapidjson::kNullType: return none();
    case rapidjson::kFalseType: return boolean(false);
    case rapidjson::kTrueType: return boolean(true);
    case rapidjson::kStringType: return view(std::string_view(j.GetString(), j.GetStringLength()));
    case rapidjson::kNumberType:
      if (j.IsInt64()) return integer(j.GetInt64());
      return flt(j.GetDouble());
    case rapidjson::kArrayType: {
      Value v;
      v.k = K::JArr;
      v.u.j = &j;
      return v;
    }
    case rapidjson::kObjectType: {
      Value v;
      v.k = K::JObj;
      v.u.j = &j;
      return v;
    }
  }
  return none();
}

Value make_list(std::vector<Value> items, bool tuple = false) {
  auto o = std::make_shared<ListObj>();
  o->v = std::move(items);
  o->tuple = tuple;
  Value v;
  v.k = K::List;
  v.o = std::move(o);
  return v;
}
ListObj& list_obj(const Value& v) { return static_cast<ListObj&>(*v.o); }
DictObj& dict_obj(const Value& v) { return static_cast<DictObj&>(*v.o); }
Value make_dict(std::shared_ptr<DictObj> d, K kind = K::Dict) {
  Value v;
  v.k = kind;
  v.o = std::move(d);
  return v;
}

// Sizes and elements of list-like values without copying JSON arrays.
size_t list_size(const Value& v) {
  return v.k == K::List ? list_obj(v).v.size() : v.u.j->Size();
}
Value list_at(const Value& v, size_t i) {
  return v.k == K::List ? list_obj(v).v[i] : Value::json((*v.u.j)[static_cast<rapidjson::SizeType>(i)]);
}
size_t dict_size(const Value& v) {
  return v.k == K::JObj ? v.u.j->MemberCount() : dict_obj(v).v.size();
}
template <typename F>
void dict_each(const Value& v, F&& f) {
  if (v.k == K::JObj) {
    for (auto it = v.u.j->MemberBegin(); it != v.u.j->MemberEnd(); ++it)
      f(Value::view(std::string_view(it->name.GetString(), it->name.GetStringLength())), Value::json(it->value));
  } else {
    for (const auto& kv : dict_obj(v).v) f(kv.first, kv.second);
  }
}
// A dict's value for `key`, or nullptr-like Undef with found=false.
bool dict_get(const Value& v, std::string_view key, Value* out) {
  if (v.k == K::JObj) {
    // FindMember needs a NUL-free view; compare lengths ourselves.
    for (auto it = v.u.j->MemberBegin(); it != v.u.j->MemberEnd(); ++it) {
      if (it->name.GetStringLength() == key.size() && std::memcmp(it->name.GetString(), key.data(), key.size()) == 0) {
        *out = Value::json(it->value);
        return true;
      }
    }
    return false;
  }
  const Value* p = dict_obj(v).find(key);
  if (!p) return false;
  *out = *p;
  return true;
}

// Callables: builtins, bound methods, macros, `caller`, loop.cycle.
struct Stmt;
struct MacroDef;
struct Frame;
enum class Fn : uint8_t { Range, Namespace, Dict, RaiseException, StrftimeNow, Method, Macro, LoopCycle, LoopChanged };
struct FuncObj : Obj {
  Fn fn;
  Value self;                 // Method: the receiver
  std::string name;           // Method: the method name; Macro: macro name
  const MacroDef* macro = nullptr;
  const Frame* scope = nullptr;   // the frame free names resolve in (nullptr: the template's top level)
  std::shared_ptr<Frame> captured;  // a macro defined inside a loop / macro: the variables it saw there
  Value caller;                   // Macro invoked from a call block: its `caller`
};
Value make_func(Fn fn) {
  auto f = std::make_shared<FuncObj>();
  f->fn = fn;
  Value v;
  v.k = K::Func;
  v.o = std::move(f);
  return v;
}
FuncObj& func_obj(const Value& v) { return static_cast<FuncObj&>(*v.o); }

struct LoopObj : Obj {
  int64_t index0 = 0, length = 0;
  std::vector<Value> items;
  Value last_changed;
  bool has_changed = false;
};

// ---------------------------------------------------------------------------------------------
// Text helpers (UTF-8 aware where Python counts code points)

bool is_ascii(std::string_view s) {
  for (unsigned char c : s)
    if (c >= 0x80) return false;
  return true;
}
// Decodes one code point at s[i] (invalid bytes count as one code point each).
uint32_t decode_at(std::string_view s, size_t i, size_t* len) {
  unsigned char c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) { *len = 1; return c; }
  int n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
  if (n == 1 || i + n > s.size()) { *len = 1; return c; }
  uint32_t cp = c & (0xFF >> (n + 1));
  for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  *len = n;
  return cp;
}
void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) out += char(cp);
  else if (cp < 0x800) { out += char(0xC0 | (cp >> 6)); out += char(0x80 | (cp & 0x3F)); }
  else if (cp < 0x10000) { out += char(0xE0 | (cp >> 12)); out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F)); }
  else { out += char(0xF0 | (cp >> 18)); out += char(0x80 | ((cp >> 12) & 0x3F)); out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F)); }
}
// Byte offsets of each code point start, plus the end.
std::vector<size_t> cp_offsets(std::string_view s) {
  std::vector<size_t> off;
  off.reserve(s.size() + 1);
  for (size_t i = 0; i < s.size();) {
    off.push_back(i);
    size_t n;
    decode_at(s, i, &n);
    i += n;
  }
  off.push_back(s.size());
  return off;
}
size_t cp_count(std::string_view s) {
  if (is_ascii(s)) return s.size();
  return cp_offsets(s).size() - 1;
}
bool py_space(uint32_t c) {
  return c == ' ' || (c >= 9 && c <= 13) || (c >= 0x1C && c <= 0x1F) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}
// Python str.strip(chars): chars empty-view+null means whitespace.
std::string_view py_strip(std::string_view s, const std::string_view* chars, bool left, bool right) {
  std::vector<uint32_t> set;
  if (chars) {
    for (size_t i = 0; i < chars->size();) {
      size_t n;
      set.push_back(decode_at(*chars, i, &n));
      i += n;
    }
  }
  auto strip_it = [&](uint32_t c) {
    return chars ? std::find(set.begin(), set.end(), c) != set.end() : py_space(c);
  };
  size_t b = 0, e = s.size();
  if (left) {
    while (b < e) {
      size_t n;
      uint32_t c = decode_at(s, b, &n);
      if (!strip_it(c)) break;
      b += n;
    }
  }
  if (right) {
    while (e > b) {
      size_t st = e - 1;
      while (st > b && (static_cast<unsigned char>(s[st]) & 0xC0) == 0x80) --st;
      size_t n;
      uint32_t c = decode_at(s, st, &n);
      if (st + n != e) n = e - st;
      if (!strip_it(c)) break;
      e = st;
    }
  }
  return s.substr(b, e - b);
}
std::string map_case(std::string_view s, int mode /*0 lower 1 upper*/) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    size_t n;
    uint32_t c = decode_at(s, i, &n);
    i += n;
    if (c < 0x80) {
      out += char(mode ? (c >= 'a' && c <= 'z' ? c - 32 : c) : (c >= 'A' && c <= 'Z' ? c + 32 : c));
    } else if (mode && c == 0xDF) {
      out += "SS";  // Python's full case mapping: "ß".upper() == "SS"
    } else if (!mode && c == 0x130) {
      out += "i\xcc\x87";  // "İ".lower() == "i̇"
    } else {
      append_utf8(out, static_cast<uint32_t>(mode ? utf8proc_toupper(static_cast<utf8proc_int32_t>(c))
                                                  : utf8proc_tolower(static_cast<utf8proc_int32_t>(c))));
    }
  }
  return out;
}
bool is_cased_letter(uint32_t c) {
  if (c < 0x80) return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
  auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LL || cat == UTF8PROC_CATEGORY_LT;
}
// Python str.title()
std::string py_title(std::string_view s) {
  std::string out;
  bool prev_cased = false;
  for (size_t i = 0; i < s.size();) {
    size_t n;
    uint32_t c = decode_at(s, i, &n);
    i += n;
    std::string one;
    append_utf8(one, c);
    out += map_case(one, prev_cased ? 0 : 1);
    prev_cased = is_cased_letter(c);
  }
  return out;
}
std::string py_capitalize(std::string_view s) {
  if (s.empty()) return {};
  size_t n;
  decode_at(s, 0, &n);
  return map_case(s.substr(0, n), 1) + map_case(s.substr(n), 0);
}
std::string html_escape(std::string_view s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&#34;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

// Python's float repr (shortest round-trip digits; exponent form below 1e-4 and from 1e16).
void append_float(std::string& out, double d) {
  if (std::isnan(d)) { out += "nan"; return; }
  if (std::isinf(d)) { out += d < 0 ? "-inf" : "inf"; return; }
  if (d == 0) { out += std::signbit(d) ? "-0.0" : "0.0"; return; }
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string_view sci(buf, static_cast<size_t>(r.ptr - buf));
  bool neg = sci[0] == '-';
  if (neg) sci.remove_prefix(1);
  size_t e = sci.find('e');
  std::string digits;
  for (char c : sci.substr(0, e))
    if (c != '.') digits += c;
  int exp = std::atoi(std::string(sci.substr(e + 1)).c_str());
  int decpt = exp + 1;
  if (neg) out += '-';
  if (decpt > -4 && decpt <= 16) {
    if (decpt <= 0) {
      out += "0.";
      out.append(static_cast<size_t>(-decpt), '0');
      out += digits;
    } else if (static_cast<size_t>(decpt) >= digits.size()) {
      out += digits;
      out.append(static_cast<size_t>(decpt) - digits.size(), '0');
      out += ".0";
    } else {
      out += digits.substr(0, static_cast<size_t>(decpt));
      out += '.';
      out += digits.substr(static_cast<size_t>(decpt));
    }
  } else {
    out += digits[0];
    if (digits.size() > 1) {
      out += '.';
      out += digits.substr(1);
    }
    out += 'e';
    out += exp < 0 ? '-' : '+';
    int a = std::abs(exp);
    if (a < 10) out += '0';
    out += std::to_string(a);
  }
}

void append_py_repr_str(std::string& out, std::string_view s) {
  bool has_sq = s.find('\'') != std::string_view::npos, has_dq = s.find('"') != std::string_view::npos;
  char q = (has_sq && !has_dq) ? '"' : '\'';
  out += q;
  for (unsigned char c : s) {
    if (c == static_cast<unsigned char>(q) || c == '\\') { out += '\\'; out += char(c); }
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7F) {
      char b[8];
      std::snprintf(b, sizeof b, "\\x%02x", c);
      out += b;
    } else out += char(c);
  }
  out += q;
}

// ---------------------------------------------------------------------------------------------
// Errors

struct TemplateError {
  int line, col;
  std::string msg;
};
[[noreturn]] void fail(int line, int col, std::string msg) { throw TemplateError{line, col, std::move(msg)}; }

// raise_exception(msg): surfaces as ptk::Error with exactly msg.
struct RaisedError {
  std::string msg;
};

// ---------------------------------------------------------------------------------------------
// Lexer

enum class T : uint8_t { Data, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Op, Eof };
struct Tok {
  T t;
  std::string v;  // Data text, Name, String value, Op text
  int64_t i = 0;
  double d = 0;
  int line = 1, col = 1;
};

class Lexer {
 public:
  explicit Lexer(std::string src) : s_(std::move(src)) {}

  std::vector<Tok> run() {
    size_t pos = 0;
    bool line_starting = true;
    while (pos < s_.size()) {
      size_t p = find_tag(pos);
      if (p == std::string::npos) {
        emit_data(pos, s_.size());
        break;
      }
      char kind = s_[p + 1];  // '{', '%', '#'
      char sign = p + 2 < s_.size() ? s_[p + 2] : 0;
      bool is_raw = false;
      size_t raw_body = 0;
      if (kind == '%') is_raw = match_raw_begin(p, &raw_body);
      // Data before the tag, with "-" / lstrip_blocks applied.
      std::string_view text(s_.data() + pos, p - pos);
      size_t text_end = p;
      if (sign == '-') {
        text_end = pos + rstrip_len(text);
      } else if (sign != '+' && kind != '{') {
        size_t nl = text.rfind('\n');
        size_t l_pos = nl == std::string_view::npos ? 0 : nl + 1;
        if (l_pos > 0 || line_starting) {
          bool only_blank = true;
          for (size_t k = l_pos; k < text.size(); ++k)
            if (text[k] != ' ' && text[k] != '\t') only_blank = false;
          if (only_blank) text_end = pos + l_pos;
        }
      }
      emit_data(pos, text_end);
      size_t after_sign = p + 2 + ((sign == '-' || sign == '+') ? 1 : 0);
      if (is_raw) {
        pos = lex_raw(raw_body, &line_starting);
        continue;
      }
      if (kind == '#') {
        size_t j = s_.find("#}", after_sign);
        if (j == std::string::npos) fail_at(p, "Missing end of comment tag");
        size_t end = j + 2;
        if (j > after_sign && s_[j - 1] == '-') {
          end = skip_ws(end);
        } else if (j > after_sign && s_[j - 1] == '+') {
        } else if (end < s_.size() && s_[end] == '\n') {
          ++end;
        }
        line_starting = end > 0 && s_[end - 1] == '\n';
        pos = end;
        continue;
      }
      bool block = kind == '%';
      push(block ? T::BlockBegin : T::VarBegin, p);
      pos = lex_tag(after_sign, block, &line_starting);
    }
    Tok e;
    e.t = T::Eof;
    line_col(s_.size(), &e.line, &e.col);
    toks_.push_back(e);
    return std::move(toks_);
  }

  void line_col(size_t off, int* line, int* col) {
    // Incremental: offsets are asked for in increasing order almost always.
    if (off < lc_off_) { lc_off_ = 0; lc_line_ = 1; lc_col_ = 1; }
    for (; lc_off_ < off; ++lc_off_) {
      if (s_[lc_off_] == '\n') { ++lc_line_; lc_col_ = 1; }
      else if ((static_cast<unsigned char>(s_[lc_off_]) & 0xC0) != 0x80) ++lc_col_;
    }
    *line = lc_line_;
    *col = lc_col_;
  }

 private:
  // Python's \s and str.isspace(): ASCII whitespace and Unicode's (U+00A0, U+3000, ...).
  size_t skip_ws(size_t i) const {
    while (i < s_.size()) {
      size_t n;
      if (!py_space(decode_at(s_, i, &n))) break;
      i += n;
    }
    return i;
  }
  static size_t rstrip_len(std::string_view text) { return py_strip(text, nullptr, false, true).size(); }

  [[noreturn]] void fail_at(size_t off, const std::string& msg) {
    int l, c;
    line_col(off, &l, &c);
    fail(l, c, msg);
  }
  size_t find_tag(size_t pos) {
    for (size_t i = s_.find('{', pos); i != std::string::npos; i = s_.find('{', i + 1)) {
      if (i + 1 < s_.size() && (s_[i + 1] == '{' || s_[i + 1] == '%' || s_[i + 1] == '#')) return i;
    }
    return std::string::npos;
  }
  void push(T t, size_t off, std::string v = {}) {
    Tok k;
    k.t = t;
    k.v = std::move(v);
    line_col(off, &k.line, &k.col);
    toks_.push_back(std::move(k));
  }
  void emit_data(size_t b, size_t e) {
    if (e > b) push(T::Data, b, s_.substr(b, e - b));
  }
  // `{%[-+]?\s*raw\s*(-%}\s*|%})` at p; *body = the offset after it.
  bool match_raw_begin(size_t p, size_t* body) {
    size_t i = p + 2;
    if (i < s_.size() && (s_[i] == '-' || s_[i] == '+')) ++i;
    i = skip_ws(i);
    if (s_.compare(i, 3, "raw") != 0) return false;
    i += 3;
    if (i < s_.size() && (std::isalnum(static_cast<unsigned char>(s_[i])) || s_[i] == '_')) return false;
    i = skip_ws(i);
    if (s_.compare(i, 3, "-%}") == 0) {
      i += 3;
      i = skip_ws(i);
    } else if (s_.compare(i, 2, "%}") == 0) {
      i += 2;
    } else {
      return false;
    }
    *body = i;
    return true;
  }
  size_t lex_raw(size_t body, bool* line_starting) {
    for (size_t i = s_.find("{%", body); i != std::string::npos; i = s_.find("{%", i + 1)) {
      size_t k = i + 2;
      char sign = k < s_.size() ? s_[k] : 0;
      if (sign == '-' || sign == '+') ++k;
      k = skip_ws(k);
      if (s_.compare(k, 6, "endraw") != 0) continue;
      k += 6;
      k = skip_ws(k);
      size_t end;
      if (s_.compare(k, 3, "+%}") == 0) end = k + 3;
      else if (s_.compare(k, 3, "-%}") == 0) {
        end = k + 3;
        end = skip_ws(end);
      } else if (s_.compare(k, 2, "%}") == 0) {
        end = k + 2;
        if (end < s_.size() && s_[end] == '\n') ++end;
      } else {
        continue;
      }
      std::string_view text(s_.data() + body, i - body);
      size_t text_end = i;
      if (sign == '-') {
        text_end = body + rstrip_len(text);
      } else if (sign != '+') {
        size_t nl = text.rfind('\n');
        size_t l_pos = nl == std::string_view::npos ? 0 : nl + 1;
        if (l_pos > 0) {
          bool only_blank = true;
          for (size_t q = l_pos; q < text.size(); ++q)
            if (text[q] != ' ' && text[q] != '\t') only_blank = false;
          if (only_blank) text_end = body + l_pos;
        }
      }
      emit_data(body, text_end);
      *line_starting = s_[end - 1] == '\n';
      return end;
    }
    fail_at(body, "Missing end of raw directive");
  }
  size_t lex_tag(size_t i, bool block, bool* line_starting) {
    int depth = 0;
    size_t start = i;
    while (true) {
      i = skip_ws(i);
      if (i >= s_.size()) fail_at(start, block ? "unexpected end of template: missing '%}'" : "unexpected end of template: missing '}}'");
      if (depth == 0) {
        const char* close = block ? "%}" : "}}";
        if (s_[i] == '-' && s_.compare(i + 1, 2, close) == 0) {
          push(block ? T::BlockEnd : T::VarEnd, i);
          size_t e = i + 3;
          e = skip_ws(e);
          *line_starting = s_[e - 1] == '\n';
          return e;
        }
        if (block && s_[i] == '+' && s_.compare(i + 1, 2, close) == 0) {
          push(T::BlockEnd, i);
          *line_starting = false;
          return i + 3;
        }
        if (s_.compare(i, 2, close) == 0) {
          push(block ? T::BlockEnd : T::VarEnd, i);
          size_t e = i + 2;
          if (block && e < s_.size() && s_[e] == '\n') ++e;
          *line_starting = s_[e - 1] == '\n';
          return e;
        }
      }
      char c = s_[i];
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t b = i;
        while (i < s_.size() && (std::isalnum(static_cast<unsigned char>(s_[i])) || s_[i] == '_')) ++i;
        push(T::Name, b, s_.substr(b, i - b));
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        i = lex_number(i);
      } else if (c == '\'' || c == '"') {
        i = lex_string(i);
      } else {
        static const char* ops3[] = {"//", "**", "==", "!=", ">=", "<="};
        std::string op;
        for (const char* o : ops3)
          if (s_.compare(i, 2, o) == 0) op = o;
        if (op.empty()) {
          if (std::strchr("+-/*%~[](){}<>=.:|,;", c) == nullptr || c == 0) fail_at(i, std::string("unexpected char '") + c + "'");
          op = std::string(1, c);
        }
        if (op == "(" || op == "[" || op == "{") ++depth;
        if (op == ")" || op == "]" || op == "}") {
          if (depth == 0) fail_at(i, "unexpected '" + op + "'");
          --depth;
        }
        push(T::Op, i, op);
        i += op.size();
      }
    }
  }
  size_t lex_number(size_t i) {
    size_t b = i;
    auto digits = [&] {
      while (i < s_.size() && (std::isdigit(static_cast<unsigned char>(s_[i])) || (s_[i] == '_' && i + 1 < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i + 1]))))) ++i;
    };
    digits();
    bool is_float = false;
    if (i + 1 < s_.size() && s_[i] == '.' && std::isdigit(static_cast<unsigned char>(s_[i + 1]))) {
      ++i;
      digits();
      is_float = true;
    }
    if (i < s_.size() && (s_[i] == 'e' || s_[i] == 'E')) {
      size_t k = i + 1;
      if (k < s_.size() && (s_[k] == '+' || s_[k] == '-')) ++k;
      if (k < s_.size() && std::isdigit(static_cast<unsigned char>(s_[k]))) {
        i = k;
        digits();
        is_float = true;
      }
    }
    std::string text;
    for (size_t k = b; k < i; ++k)
      if (s_[k] != '_') text += s_[k];
    Tok t;
    line_col(b, &t.line, &t.col);
    if (is_float) {
      t.t = T::Float;
      t.d = std::strtod(text.c_str(), nullptr);
    } else {
      t.t = T::Int;
      auto r = std::from_chars(text.data(), text.data() + text.size(), t.i);
      if (r.ec != std::errc()) fail_at(b, "integer literal too large: " + text);
    }
    toks_.push_back(std::move(t));
    return i;
  }
  size_t lex_string(size_t i) {
    char q = s_[i];
    size_t b = i;
    ++i;
    std::string v;
    while (true) {
      if (i >= s_.size()) fail_at(b, "unterminated string");
      char c = s_[i];
      if (c == q) { ++i; break; }
      if (c != '\\') { v += c; ++i; continue; }
      if (i + 1 >= s_.size()) fail_at(b, "unterminated string");
      char e = s_[i + 1];
      i += 2;
      switch (e) {
        case 'n': v += '\n'; break;
        case 't': v += '\t'; break;
        case 'r': v += '\r'; break;
        case '\\': v += '\\'; break;
        case '\'': v += '\''; break;
        case '"': v += '"'; break;
        case 'a': v += '\a'; break;
        case 'b': v += '\b'; break;
        case 'f': v += '\f'; break;
        case 'v': v += '\v'; break;
        case '\n': break;
        case 'x': case 'u': case 'U': {
          size_t n = e == 'x' ? 2 : e == 'u' ? 4 : 8;
          if (i + n > s_.size()) fail_at(b, "truncated \\" + std::string(1, e) + " escape");
          uint32_t cp = 0;
          for (size_t k = 0; k < n; ++k) {
            char h = s_[i + k];
            int d = std::isdigit(static_cast<unsigned char>(h)) ? h - '0' : (h >= 'a' && h <= 'f') ? h - 'a' + 10 : (h >= 'A' && h <= 'F') ? h - 'A' + 10 : -1;
            if (d < 0) fail_at(b, "truncated \\" + std::string(1, e) + " escape");
            cp = cp * 16 + static_cast<uint32_t>(d);
          }
          i += n;
          append_utf8(v, cp);
          break;
        }
        default:
          if (e >= '0' && e <= '7') {
            uint32_t cp = static_cast<uint32_t>(e - '0');
            for (int k = 0; k < 2 && i < s_.size() && s_[i] >= '0' && s_[i] <= '7'; ++k, ++i) cp = cp * 8 + static_cast<uint32_t>(s_[i] - '0');
            append_utf8(v, cp);
          } else {
            v += '\\';
            v += e;
          }
      }
    }
    push(T::String, b, std::move(v));
    return i;
  }

  std::string s_;
  std::vector<Tok> toks_;
  size_t lc_off_ = 0;
  int lc_line_ = 1, lc_col_ = 1;
};

// ---------------------------------------------------------------------------------------------
// Python methods the interpreter knows, by receiver type

bool is_str_method(std::string_view n) {
  static const char* m[] = {"strip", "lstrip", "rstrip", "split", "rsplit", "startswith", "endswith", "replace",
                            "upper", "lower", "title", "capitalize", "find", "rfind", "index", "count", "join",
                            "format", "splitlines", "isdigit", "isalpha", "isalnum", "isspace", "isupper",
                            "islower", "zfill", "center", "ljust", "rjust", "removeprefix", "removesuffix",
                            "partition", "rpartition", "casefold", "swapcase", "isnumeric", "isdecimal", "istitle",
                            "encode", "expandtabs", "rindex", "translate", "maketrans", "isidentifier",
                            "isprintable", "isascii", "format_map"};
  for (const char* x : m)
    if (n == x) return true;
  return false;
}
bool is_dict_method(std::string_view n) {
  return n == "get" || n == "items" || n == "keys" || n == "values" || n == "copy" || n == "pop" || n == "update" ||
         n == "setdefault" || n == "clear" || n == "popitem" || n == "fromkeys";
}
bool is_list_method(std::string_view n) {
  return n == "index" || n == "count" || n == "append" || n == "extend" || n == "insert" || n == "pop" ||
         n == "remove" || n == "reverse" || n == "sort" || n == "copy" || n == "clear";
}
// Which kinds of receiver `name` is a method of (kStrMethod | kDictMethod | kListMethod).
enum : uint8_t { kStrMethod = 1, kDictMethod = 2, kListMethod = 4 };
uint8_t method_mask(std::string_view n) {
  return static_cast<uint8_t>((is_str_method(n) ? kStrMethod : 0) | (is_dict_method(n) ? kDictMethod : 0) |
                              (is_list_method(n) ? kListMethod : 0));
}


// ---------------------------------------------------------------------------------------------
// AST

enum class E : uint8_t {
  Const, Name, GetAttr, GetItem, Slice, Call, Filter, Test, Neg, Pos, Not, And, Or, Bin, Compare, Concat, Cond,
  ListLit, TupleLit, DictLit
};
enum class Op : uint8_t { Add, Sub, Mul, Div, FloorDiv, Mod, Pow, Eq, Ne, Lt, Le, Gt, Ge, In, NotIn };

struct Expr {
  E kind;
  int line = 0, col = 0;
  Value constant;                       // Const
  std::string name;                     // Name, GetAttr attr, Filter / Test name
  std::vector<std::unique_ptr<Expr>> a;  // operands, call args, list items, dict k,v pairs
  std::vector<std::pair<std::string, std::unique_ptr<Expr>>> kw;
  std::vector<Op> ops;  // Bin: ops[0]; Compare: one per rest operand
  int id = -1;          // Filter / Test id
  uint8_t methods = 0;  // GetAttr: method_mask(name), computed once at parse time
  bool negated = false;  // Test
  bool has_slice_part[3] = {false, false, false};
};
using ExprP = std::unique_ptr<Expr>;

enum class S : uint8_t { Text, Output, If, For, Set, SetAttr, SetBlock, Macro, CallBlock, FilterBlock, Generation, Break, Continue, With };

struct Target {  // assignment target: a name, ns.attr, or a tuple of names
  std::vector<std::string> names;
  bool tuple = false;
};

struct MacroDef {
  std::string name;
  std::vector<std::string> params;
  std::vector<ExprP> defaults;  // aligned to the last params
  std::vector<std::unique_ptr<Stmt>> body;
  bool uses_varargs = false;  // the body names `varargs` / `kwargs`: extra arguments land there
  bool uses_kwargs = false;
};

struct Stmt {
  S kind;
  int line = 0, col = 0;
  std::string text;  // Text
  ExprP expr;        // Output / Set value / For iterable / FilterBlock: filter chain applied to a placeholder
  std::vector<std::pair<ExprP, std::vector<std::unique_ptr<Stmt>>>> branches;  // If: (cond or null for else, body)
  Target target;          // For / Set / SetBlock
  std::string attr;       // SetAttr: ns.attr
  ExprP cond;             // For filter
  std::vector<std::unique_ptr<Stmt>> body, else_body;
  std::unique_ptr<MacroDef> macro;  // Macro / CallBlock (the caller)
  std::vector<std::pair<Target, ExprP>> assigns;  // With
};
using StmtP = std::unique_ptr<Stmt>;
using Body = std::vector<StmtP>;

// Filters and tests, resolved at parse time.
const char* const kFilters[] = {
    "tojson", "trim", "length", "count", "first", "last", "join", "upper", "lower", "string", "list", "items",
    "default", "d", "selectattr", "rejectattr", "select", "reject", "map", "reverse", "safe", "capitalize",
    "replace", "int", "float", "abs", "round", "dictsort", "indent", "unique", "sort", "sum", "min", "max",
    "batch", "title", "wordcount", "center", "e", "escape", "attr", "forceescape", "format"};
// jinja2's other builtin filters: refused at parse time as outside the subset (no template TRL ships uses them).
const char* const kUnsupportedFilters[] = {"filesizeformat", "groupby", "pprint", "random", "slice", "striptags",
                                           "truncate", "urlencode", "urlize", "wordwrap", "xmlattr"};
enum Filt {
  F_tojson, F_trim, F_length, F_count, F_first, F_last, F_join, F_upper, F_lower, F_string, F_list, F_items,
  F_default, F_d, F_selectattr, F_rejectattr, F_select, F_reject, F_map, F_reverse, F_safe, F_capitalize,
  F_replace, F_int, F_float, F_abs, F_round, F_dictsort, F_indent, F_unique, F_sort, F_sum, F_min, F_max,
  F_batch, F_title, F_wordcount, F_center, F_e, F_escape, F_attr, F_forceescape, F_format
};
const char* const kTests[] = {
    "defined", "undefined", "none", "string", "number", "integer", "float", "boolean", "mapping", "iterable",
    "sequence", "true", "false", "odd", "even", "divisibleby", "eq", "equalto", "==", "ne", "!=", "lt", "<",
    "lessthan", "le", "<=", "gt", ">", "greaterthan", "ge", ">=", "in", "callable", "sameas", "lower", "upper",
    "filter", "test", "escaped"};
enum Tst {
  T_defined, T_undefined, T_none, T_string, T_number, T_integer, T_float, T_boolean, T_mapping, T_iterable,
  T_sequence, T_true, T_false, T_odd, T_even, T_divisibleby, T_eq, T_equalto, T_eq2, T_ne, T_ne2, T_lt, T_lt2,
  T_lessthan, T_le, T_le2, T_gt, T_gt2, T_greaterthan, T_ge, T_ge2, T_in, T_callable, T_sameas, T_lower, T_upper,
  T_filter, T_test, T_escaped
};
template <size_t N>
int lookup(const char* const (&names)[N], std::string_view n) {
  for (size_t i = 0; i < N; ++i)
    if (n == names[i]) return static_cast<int>(i);
  return -1;
}

// ---------------------------------------------------------------------------------------------
// Parser

class Parser {
 public:
  explicit Parser(std::vector<Tok> toks) : t_(std::move(toks)) {}

  Body parse_template(bool* has_generation) {
    Body b = subparse({});
    if (cur().t != T::Eof) fail_here("unexpected tag");
    *has_generation = has_generation_;
    return b;
  }

 private:
  const Tok& cur() const { return t_[p_]; }
  const Tok& peek(size_t n = 1) const { return t_[std::min(p_ + n, t_.size() - 1)]; }
  Tok next() { return t_[p_ < t_.size() - 1 ? p_++ : p_]; }
  [[noreturn]] void fail_here(const std::string& msg) const { fail(cur().line, cur().col, msg); }
  bool is_op(const char* o) const { return cur().t == T::Op && cur().v == o; }
  bool is_name(const char* n) const { return cur().t == T::Name && cur().v == n; }
  void expect_op(const char* o) {
    if (!is_op(o)) fail_here(std::string("expected '") + o + "', got " + describe(cur()));
    next();
  }
  std::string expect_name() {
    if (cur().t != T::Name) fail_here("expected a name, got " + describe(cur()));
    return next().v;
  }
  void expect_block_end() {
    if (cur().t != T::BlockEnd) fail_here("expected end of statement block, got " + describe(cur()));
    next();
  }
  static std::string describe(const Tok& t) {
    switch (t.t) {
      case T::Data: return "template data";
      case T::VarBegin: return "'{{'";
      case T::VarEnd: return "'}}'";
      case T::BlockBegin: return "'{%'";
      case T::BlockEnd: return "'%}'";
      case T::Name: return "'" + t.v + "'";
      case T::String: return "a string";
      case T::Int: case T::Float: return "a number";
      case T::Op: return "'" + t.v + "'";
      case T::Eof: return "end of template";
    }
    return "?";
  }
  struct DepthGuard {
    Parser* p;
    explicit DepthGuard(Parser* q) : p(q) {
      if (++p->depth_ > kMaxParseDepth) p->fail_here("template nested deeper than " + std::to_string(kMaxParseDepth) + " levels");
    }
    ~DepthGuard() { --p->depth_; }
  };

  // Parses statements until a `{% name %}` with name in `ends` (left unconsumed) or Eof.
  Body subparse(std::initializer_list<const char*> ends) {
    DepthGuard g(this);
    Body body;
    while (true) {
      const Tok& t = cur();
      if (t.t == T::Eof) {
        if (ends.size()) {
          std::string want;
          for (const char* e : ends) want += std::string(want.empty() ? "" : " or ") + "'" + e + "'";
          fail_here("unexpected end of template: expected " + want);
        }
        return body;
      }
      if (t.t == T::Data) {
        auto s = std::make_unique<Stmt>();
        s->kind = S::Text;
        s->line = t.line;
        s->text = t.v;
        next();
        body.push_back(std::move(s));
      } else if (t.t == T::VarBegin) {
        auto s = std::make_unique<Stmt>();
        s->kind = S::Output;
        s->line = t.line;
        s->col = t.col;
        next();
        s->expr = parse_tuple();
        if (cur().t != T::VarEnd) fail_here("expected end of print statement, got " + describe(cur()));
        next();
        body.push_back(std::move(s));
      } else if (t.t == T::BlockBegin) {
        const Tok& n = peek();
        if (n.t == T::Name)
          for (const char* e : ends)
            if (n.v == e) return body;
        next();
        body.push_back(parse_statement());
      } else {
        fail_here("unexpected " + describe(t));
      }
    }
  }

  StmtP parse_statement() {
    if (cur().t != T::Name) fail_here("tag name expected");
    Tok tag = cur();
    auto s = std::make_unique<Stmt>();
    s->line = tag.line;
    s->col = tag.col;
    const std::string& n = tag.v;
    next();
    if (n == "if") {
      s->kind = S::If;
      ExprP c = parse_tuple();
      expect_block_end();
      while (true) {
        Body b = subparse({"elif", "else", "endif"});
        s->branches.emplace_back(std::move(c), std::move(b));
        next();  // BlockBegin
        std::string w = next().v;
        if (w == "elif") {
          c = parse_tuple();
          expect_block_end();
        } else if (w == "else") {
          expect_block_end();
          Body eb = subparse({"endif"});
          s->branches.emplace_back(nullptr, std::move(eb));
          next();
          next();
          expect_block_end();
          break;
        } else {
          expect_block_end();
          break;
        }
      }
    } else if (n == "for") {
      s->kind = S::For;
      s->target = parse_target(true);
      if (!is_name("in")) fail_here("expected 'in', got " + describe(cur()));
      next();
      s->expr = parse_tuple(/*no_condexpr=*/true);
      if (is_name("if")) {
        next();
        s->cond = parse_tuple();
      }
      if (is_name("recursive")) fail_here("recursive for loops are not supported by ptk's chat-template interpreter");
      expect_block_end();
      ++loop_depth_;
      s->body = subparse({"endfor", "else"});
      --loop_depth_;
      next();
      if (next().v == "else") {
        expect_block_end();
        s->else_body = subparse({"endfor"});
        next();
        next();
      }
      expect_block_end();
    } else if (n == "set") {
      Tok first = cur();
      std::string name = expect_name();
      if (is_op(".")) {
        next();
        s->kind = S::SetAttr;
        s->target.names = {name};
        s->attr = expect_name();
        expect_op("=");
        s->expr = parse_tuple();
        expect_block_end();
      } else {
        s->target.names = {name};
        while (is_op(",")) {
          next();
          s->target.tuple = true;
          if (cur().t != T::Name) break;
          s->target.names.push_back(expect_name());
        }
        if (is_op("=")) {
          next();
          s->kind = S::Set;
          s->expr = parse_tuple();
          expect_block_end();
        } else {
          if (s->target.tuple) fail_here("expected '='");
          s->kind = S::SetBlock;
          if (is_op("|")) s->expr = parse_filter_chain(make_placeholder());
          expect_block_end();
          s->body = subparse({"endset"});
          next();
          next();
          expect_block_end();
        }
      }
    } else if (n == "macro") {
      s->kind = S::Macro;
      s->macro = std::make_unique<MacroDef>();
      s->macro->name = expect_name();
      parse_signature(*s->macro);
      expect_block_end();
      int saved_loops = loop_depth_;
      loop_depth_ = 0;
      macros_.push_back(s->macro.get());
      s->macro->body = subparse({"endmacro"});
      macros_.pop_back();
      loop_depth_ = saved_loops;
      next();
      next();
      if (cur().t == T::Name && cur().v == s->macro->name) next();
      expect_block_end();
    } else if (n == "call") {
      s->kind = S::CallBlock;
      s->macro = std::make_unique<MacroDef>();
      s->macro->name = "caller";
      if (is_op("(")) parse_signature(*s->macro);
      s->expr = parse_expression();
      if (s->expr->kind != E::Call) fail(s->expr->line, s->expr->col, "expected a call");
      expect_block_end();
      int saved_loops = loop_depth_;
      loop_depth_ = 0;
      macros_.push_back(s->macro.get());
      s->macro->body = subparse({"endcall"});
      macros_.pop_back();
      loop_depth_ = saved_loops;
      next();
      next();
      expect_block_end();
    } else if (n == "filter") {
      s->kind = S::FilterBlock;
      s->expr = parse_filter_chain(make_placeholder(), /*leading_pipe=*/false);
      expect_block_end();
      s->body = subparse({"endfilter"});
      next();
      next();
      expect_block_end();
    } else if (n == "generation") {
      s->kind = S::Generation;
      has_generation_ = true;
      expect_block_end();
      s->body = subparse({"endgeneration"});
      next();
      next();
      expect_block_end();
    } else if (n == "break" || n == "continue") {
      s->kind = n == "break" ? S::Break : S::Continue;
      if (loop_depth_ == 0) fail(tag.line, tag.col, "'" + n + "' outside loop");
      expect_block_end();
    } else if (n == "with") {
      s->kind = S::With;
      while (cur().t != T::BlockEnd) {
        if (!s->assigns.empty()) expect_op(",");
        Target tg = parse_target(false);
        expect_op("=");
        s->assigns.emplace_back(std::move(tg), parse_expression());
      }
      expect_block_end();
      s->body = subparse({"endwith"});
      next();
      next();
      expect_block_end();
    } else {
      fail(tag.line, tag.col, "Encountered unknown tag '" + n + "'" +
                                  (n == "include" || n == "extends" || n == "import" || n == "block" || n == "from"
                                       ? " (template inheritance and includes are outside ptk's chat-template subset)"
                                       : ""));
    }
    return s;
  }

  Target parse_target(bool for_loop) {
    Target tg;
    bool paren = is_op("(");
    if (paren) next();
    tg.names.push_back(expect_name());
    while (is_op(",")) {
      next();
      tg.tuple = true;
      if (cur().t != T::Name) break;
      tg.names.push_back(expect_name());
    }
    if (paren) expect_op(")");
    (void)for_loop;
    return tg;
  }

  void parse_signature(MacroDef& m) {
    expect_op("(");
    while (!is_op(")")) {
      if (!m.params.empty()) expect_op(",");
      if (is_op(")")) break;
      m.params.push_back(expect_name());
      if (is_op("=")) {
        next();
        m.defaults.push_back(parse_expression());
      } else if (!m.defaults.empty()) {
        fail_here("non-default argument follows default argument");
      }
    }
    next();
  }

  ExprP node(E k, const Tok& at) {
    auto e = std::make_unique<Expr>();
    e->kind = k;
    e->line = at.line;
    e->col = at.col;
    return e;
  }
  ExprP make_placeholder() {
    auto e = node(E::Name, cur());
    e->name = "\x01filter_input";
    return e;
  }

  // tuple without parentheses: `a, b` (used for print, set, if, for iterables)
  ExprP parse_tuple(bool no_condexpr = false) {
    Tok at = cur();
    std::vector<ExprP> items;
    bool is_tuple = false;
    while (true) {
      if (!items.empty()) {
        if (!is_op(",")) break;
        next();
        is_tuple = true;
        if (cur().t == T::BlockEnd || cur().t == T::VarEnd || is_op(")") || is_name("in") || is_name("if")) break;
      }
      items.push_back(no_condexpr ? parse_or() : parse_expression());
    }
    if (!is_tuple) return std::move(items[0]);
    auto e = node(E::TupleLit, at);
    e->a = std::move(items);
    return e;
  }

  ExprP parse_expression() {
    DepthGuard g(this);
    ExprP e = parse_or();
    while (is_name("if")) {
      Tok at = next();
      auto c = node(E::Cond, at);
      ExprP cond = parse_or();
      ExprP other;
      if (is_name("else")) {
        next();
        other = parse_expression();
      }
      c->a.push_back(std::move(cond));
      c->a.push_back(std::move(e));
      c->a.push_back(std::move(other));
      e = std::move(c);
    }
    return e;
  }
  ExprP parse_or() {
    ExprP e = parse_and();
    while (is_name("or")) {
      Tok at = next();
      auto n = node(E::Or, at);
      n->a.push_back(std::move(e));
      n->a.push_back(parse_and());
      e = std::move(n);
    }
    return e;
  }
  ExprP parse_and() {
    ExprP e = parse_not();
    while (is_name("and")) {
      Tok at = next();
      auto n = node(E::And, at);
      n->a.push_back(std::move(e));
      n->a.push_back(parse_not());
      e = std::move(n);
    }
    return e;
  }
  ExprP parse_not() {
    if (is_name("not")) {
      DepthGuard g(this);
      Tok at = next();
      auto n = node(E::Not, at);
      n->a.push_back(parse_not());
      return n;
    }
    return parse_compare();
  }
  ExprP parse_compare() {
    Tok at = cur();
    ExprP e = parse_math1();
    std::unique_ptr<Expr> cmp;
    while (true) {
      Op op;
      if (is_op("==")) op = Op::Eq;
      else if (is_op("!=")) op = Op::Ne;
      else if (is_op("<")) op = Op::Lt;
      else if (is_op("<=")) op = Op::Le;
      else if (is_op(">")) op = Op::Gt;
      else if (is_op(">=")) op = Op::Ge;
      else if (is_name("in")) op = Op::In;
      else if (is_name("not") && peek().t == T::Name && peek().v == "in") {
        next();
        op = Op::NotIn;
      } else break;
      next();
      if (!cmp) {
        cmp = node(E::Compare, at);
        cmp->a.push_back(std::move(e));
      }
      cmp->ops.push_back(op);
      cmp->a.push_back(parse_math1());
    }
    return cmp ? std::move(cmp) : std::move(e);
  }
  ExprP bin(Op op, ExprP l, ExprP r, const Tok& at) {
    auto n = node(E::Bin, at);
    n->ops.push_back(op);
    n->a.push_back(std::move(l));
    n->a.push_back(std::move(r));
    return n;
  }
  ExprP parse_math1() {
    ExprP e = parse_concat();
    while (is_op("+") || is_op("-")) {
      Tok at = next();
      e = bin(at.v == "+" ? Op::Add : Op::Sub, std::move(e), parse_concat(), at);
    }
    return e;
  }
  ExprP parse_concat() {
    Tok at = cur();
    ExprP e = parse_math2();
    if (!is_op("~")) return e;
    auto n = node(E::Concat, at);
    n->a.push_back(std::move(e));
    while (is_op("~")) {
      next();
      n->a.push_back(parse_math2());
    }
    return n;
  }
  ExprP parse_math2() {
    ExprP e = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      Tok at = next();
      Op op = at.v == "*" ? Op::Mul : at.v == "/" ? Op::Div : at.v == "//" ? Op::FloorDiv : Op::Mod;
      e = bin(op, std::move(e), parse_pow(), at);
    }
    return e;
  }
  ExprP parse_pow() {
    ExprP e = parse_unary();
    while (is_op("**")) {
      Tok at = next();
      e = bin(Op::Pow, std::move(e), parse_unary(), at);
    }
    return e;
  }
  ExprP parse_unary(bool with_filter = true) {
    DepthGuard g(this);
    ExprP e;
    if (is_op("-") || is_op("+")) {
      Tok at = next();
      e = node(at.v == "-" ? E::Neg : E::Pos, at);
      e->a.push_back(parse_unary(false));
    } else {
      e = parse_primary();
    }
    e = parse_postfix(std::move(e));
    if (with_filter) e = parse_filter_expr(std::move(e));
    return e;
  }
  ExprP parse_primary() {
    Tok t = cur();
    if (t.t == T::Name) {
      next();
      if (t.v == "true" || t.v == "True" || t.v == "false" || t.v == "False") {
        auto e = node(E::Const, t);
        e->constant = Value::boolean(t.v == "true" || t.v == "True");
        return e;
      }
      if (t.v == "none" || t.v == "None") {
        auto e = node(E::Const, t);
        e->constant = Value::none();
        return e;
      }
      auto e = node(E::Name, t);
      e->name = t.v;
      if (!macros_.empty() && t.v == "varargs") macros_.back()->uses_varargs = true;
      if (!macros_.empty() && t.v == "kwargs") macros_.back()->uses_kwargs = true;
      return e;
    }
    if (t.t == T::String) {
      std::string s;
      while (cur().t == T::String) s += next().v;
      auto e = node(E::Const, t);
      e->constant = Value::str(std::move(s));
      return e;
    }
    if (t.t == T::Int || t.t == T::Float) {
      next();
      auto e = node(E::Const, t);
      e->constant = t.t == T::Int ? Value::integer(t.i) : Value::flt(t.d);
      return e;
    }
    if (is_op("(")) {
      next();
      if (is_op(")")) {
        next();
        return node(E::TupleLit, t);
      }
      ExprP inner = parse_expression();
      if (is_op(",")) {
        auto tup = node(E::TupleLit, t);
        tup->a.push_back(std::move(inner));
        while (is_op(",")) {
          next();
          if (is_op(")")) break;
          tup->a.push_back(parse_expression());
        }
        inner = std::move(tup);
      }
      expect_op(")");
      return inner;
    }
    if (is_op("[")) {
      next();
      auto e = node(E::ListLit, t);
      while (!is_op("]")) {
        if (!e->a.empty()) expect_op(",");
        if (is_op("]")) break;
        e->a.push_back(parse_expression());
      }
      next();
      return e;
    }
    if (is_op("{")) {
      next();
      auto e = node(E::DictLit, t);
      while (!is_op("}")) {
        if (!e->a.empty()) expect_op(",");
        if (is_op("}")) break;
        e->a.push_back(parse_expression());
        expect_op(":");
        e->a.push_back(parse_expression());
      }
      next();
      return e;
    }
    fail_here("unexpected " + describe(t));
  }
  ExprP parse_postfix(ExprP e) {
    while (true) {
      if (is_op(".")) {
        Tok at = next();
        if (cur().t == T::Int) {
          auto n = node(E::GetItem, at);
          auto k = node(E::Const, cur());
          k->constant = Value::integer(next().i);
          n->a.push_back(std::move(e));
          n->a.push_back(std::move(k));
          e = std::move(n);
        } else {
          auto n = node(E::GetAttr, at);
          n->name = expect_name();
          n->methods = method_mask(n->name);
          n->a.push_back(std::move(e));
          e = std::move(n);
        }
      } else if (is_op("[")) {
        Tok at = next();
        e = parse_subscript(std::move(e), at);
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }
  ExprP parse_subscript(ExprP obj, const Tok& at) {
    // [expr] or [a:b:c] (each part optional)
    ExprP parts[3];
    bool slice = false;
    int idx = 0;
    while (!is_op("]")) {
      if (is_op(":")) {
        next();
        slice = true;
        if (++idx > 2) fail_here("too many ':' in slice");
        continue;
      }
      if (parts[idx]) fail_here("expected ']' or ':'");
      parts[idx] = parse_expression();
      if (!slice && is_op(",")) fail_here("tuple subscripts are not supported");
    }
    next();
    if (!slice) {
      if (!parts[0]) fail(at.line, at.col, "expected an expression in '[]'");
      auto n = node(E::GetItem, at);
      n->a.push_back(std::move(obj));
      n->a.push_back(std::move(parts[0]));
      return n;
    }
    auto n = node(E::Slice, at);
    n->a.push_back(std::move(obj));
    for (int k = 0; k < 3; ++k) {
      n->has_slice_part[k] = parts[k] != nullptr;
      n->a.push_back(std::move(parts[k]));
    }
    return n;
  }
  void parse_call_args(Expr& n) {
    expect_op("(");
    bool first = true;
    while (!is_op(")")) {
      if (!first) expect_op(",");
      first = false;
      if (is_op(")")) break;
      if (is_op("*") || is_op("**")) fail_here("*args / **kwargs in calls are not supported");
      if (cur().t == T::Name && peek().t == T::Op && peek().v == "=") {
        std::string k = next().v;
        next();
        n.kw.emplace_back(std::move(k), parse_expression());
      } else {
        if (!n.kw.empty()) fail_here("positional argument follows keyword argument");
        n.a.push_back(parse_expression());
      }
    }
    next();
  }
  ExprP parse_call(ExprP callee) {
    Tok at = cur();
    at.line = callee->line;
    at.col = callee->col;
    auto n = node(E::Call, at);
    n->a.push_back(std::move(callee));
    parse_call_args(*n);
    return n;
  }
  ExprP parse_filter_expr(ExprP e) {
    while (true) {
      if (is_op("|")) {
        e = parse_filter_chain(std::move(e));
      } else if (is_name("is")) {
        e = parse_test(std::move(e));
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }
  // `| f(args) | g ...` (leading_pipe: the first '|' is still to be read)
  ExprP parse_filter_chain(ExprP e, bool leading_pipe = true) {
    bool first = true;
    while (is_op("|") || (first && !leading_pipe)) {
      if (is_op("|")) next();
      first = false;
      Tok at = cur();
      std::string name = expect_name();
      while (is_op(".")) {
        next();
        name += "." + expect_name();
      }
      int id = lookup(kFilters, name);
      if (id < 0 && lookup(kUnsupportedFilters, name) >= 0)
        fail(at.line, at.col, "filter '" + name + "' is outside ptk's chat-template subset");
      if (id < 0) fail(at.line, at.col, "No filter named '" + name + "'.");
      auto n = node(E::Filter, at);
      n->name = name;
      n->id = id;
      n->a.push_back(std::move(e));
      if (is_op("(")) parse_call_args(*n);
      e = std::move(n);
    }
    return e;
  }
  ExprP parse_test(ExprP e) {
    next();  // is
    bool negated = false;
    if (is_name("not")) {
      next();
      negated = true;
    }
    Tok at = cur();
    std::string name;
    if (cur().t == T::Name) name = next().v;
    else fail_here("expected a test name, got " + describe(cur()));
    int id = lookup(kTests, name);
    if (id < 0) fail(at.line, at.col, "No test named '" + name + "'.");
    auto n = node(E::Test, at);
    n->name = name;
    n->id = id;
    n->negated = negated;
    n->a.push_back(std::move(e));
    if (is_op("(")) {
      parse_call_args(*n);
    } else if ((cur().t == T::Name || cur().t == T::String || cur().t == T::Int || cur().t == T::Float || is_op("(") ||
                is_op("[") || is_op("{")) &&
               !is_name("else") && !is_name("or") && !is_name("and")) {
      if (is_name("is")) fail_here("You cannot chain multiple tests with is");
      ExprP arg = parse_postfix(parse_primary());
      n->a.push_back(std::move(arg));
    }
    return n;
  }

  std::vector<Tok> t_;
  size_t p_ = 0;
  int depth_ = 0;
  int loop_depth_ = 0;
  std::vector<MacroDef*> macros_;
  bool has_generation_ = false;
};

// ---------------------------------------------------------------------------------------------
// Rendering

struct Frame {
  const Frame* parent = nullptr;
  std::vector<std::pair<std::string_view, Value>> vars;
  const Value* find(std::string_view n) const {
    for (const Frame* f = this; f; f = f->parent)
      for (auto it = f->vars.rbegin(); it != f->vars.rend(); ++it)
        if (it->first == n) return &it->second;
    return nullptr;
  }
  void set(std::string_view n, Value v) {
    for (auto& kv : vars)
      if (kv.first == n) {
        kv.second = std::move(v);
        return;
      }
    vars.emplace_back(n, std::move(v));
  }
};

enum class Flow { Normal, Break, Continue };

const char* type_name(const Value& v) {
  switch (v.k) {
    case K::Undef: return "Undefined";
    case K::None: return "NoneType";
    case K::Bool: return "bool";
    case K::Int: return "int";
    case K::Float: return "float";
    case K::Str: return "str";
    case K::List: return list_obj(v).tuple ? "tuple" : "list";
    case K::JArr: return "list";
    case K::Dict: case K::JObj: return "dict";
    case K::NS: return "Namespace";
    case K::Func: return "function";
    case K::Loop: return "LoopContext";
  }
  return "object";
}

class Renderer {
 public:
  Renderer(const Template::Impl& t, const rapidjson::Value& ctx) : t_(t), ctx_(ctx) {}
  Rendering run();

 private:
  friend struct Template::Impl;
  // --- errors
  [[noreturn]] void err(const Expr& e, const std::string& m) { fail(e.line, e.col, m); }
  [[noreturn]] void undefined_error(const Expr& at, const Value& u) {
    static const char* kinds[] = {"dict", "list", "str", "int", "float", "bool", "NoneType", "Namespace"};
    if (u.undef_kind == 1) err(at, std::string("'") + kinds[u.u.i] + " object' has no attribute '" + std::string(u.s) + "'");
    if (u.undef_kind == 2) err(at, std::string(kinds[u.u.i & 15]) + " object has no element " + std::to_string(u.u.i >> 4));
    if (u.s.empty()) err(at, "value is undefined");
    err(at, "'" + std::string(u.s) + "' is undefined");
  }
  // seq[index] out of range: undefined, "list object has no element 5" when used.
  static Value no_element(int type, int64_t index) {
    Value v = Value::undef();
    v.undef_kind = 2;
    v.u.i = static_cast<int64_t>(static_cast<uint64_t>(index) << 4) | type;
    return v;
  }
  static int type_code(const Value& v) {
    switch (v.k) {
      case K::Dict: case K::JObj: return 0;
      case K::List: case K::JArr: return 1;
      case K::Str: return 2;
      case K::Int: return 3;
      case K::Float: return 4;
      case K::Bool: return 5;
      case K::None: return 6;
      default: return 7;
    }
  }

  // --- output
  void out(std::string_view s) {
    buf_->append(s);
    if (buf_->size() > kMaxOutputBytes) throw TemplateError{cur_line_, 0, "output larger than 64 MiB: refusing to render further"};
  }

  // --- conversions
  bool truthy(const Value& v) {
    switch (v.k) {
      case K::Undef: case K::None: return false;
      case K::Bool: return v.u.b;
      case K::Int: return v.u.i != 0;
      case K::Float: return v.u.d != 0;
      case K::Str: return !v.s.empty();
      case K::List: return !list_obj(v).v.empty();
      case K::JArr: return !v.u.j->Empty();
      case K::Dict: return !dict_obj(v).v.empty();
      case K::JObj: return v.u.j->MemberCount() != 0;
      default: return true;
    }
  }
  void append_str(std::string& o, const Value& v) {  // Python str(v)
    switch (v.k) {
      case K::Undef: return;
      case K::Str: o.append(v.s); return;
      default: append_repr(o, v, 0);
    }
  }
  std::string to_str(const Value& v) {
    std::string s;
    append_str(s, v);
    return s;
  }
  Value str_value(const Value& v) {  // str(v) as a Value, without copying strings
    if (v.k == K::Str) return v;
    return Value::str(to_str(v));
  }
  void append_repr(std::string& o, const Value& v, int depth) {
    if (depth > 512) throw TemplateError{cur_line_, 0, "value nested too deeply to print"};
    switch (v.k) {
      case K::Undef: return;
      case K::None: o += "None"; return;
      case K::Bool: o += v.u.b ? "True" : "False"; return;
      case K::Int: o += std::to_string(v.u.i); return;
      case K::Float: append_float(o, v.u.d); return;
      case K::Str: append_py_repr_str(o, v.s); return;
      case K::List: case K::JArr: {
        bool tup = v.k == K::List && list_obj(v).tuple;
        o += tup ? '(' : '[';
        size_t n = list_size(v);
        for (size_t i = 0; i < n; ++i) {
          if (i) o += ", ";
          append_repr(o, list_at(v, i), depth + 1);
        }
        if (tup && n == 1) o += ',';
        o += tup ? ')' : ']';
        return;
      }
      case K::Dict: case K::JObj: {
        o += '{';
        bool first = true;
        dict_each(v, [&](const Value& k, const Value& x) {
          if (!first) o += ", ";
          first = false;
          append_repr(o, k, depth + 1);
          o += ": ";
          append_repr(o, x, depth + 1);
        });
        o += '}';
        return;
      }
      case K::NS: {
        o += "<Namespace {";
        bool first = true;
        for (const auto& kv : dict_obj(v).v) {
          if (!first) o += ", ";
          first = false;
          append_repr(o, kv.first, depth + 1);
          o += ": ";
          append_repr(o, kv.second, depth + 1);
        }
        o += "}>";
        return;
      }
      case K::Func: o += "<function>"; return;
      case K::Loop: {
        const auto& l = static_cast<const LoopObj&>(*v.o);
        o += "<LoopContext " + std::to_string(l.index0 + 1) + "/" + std::to_string(l.length) + ">";
        return;
      }
    }
  }
  // json.dumps
  struct JsonOpts {
    bool ensure_ascii = false;
    bool sort_keys = false;
    bool has_indent = false;
    std::string indent;
    std::string item_sep = ", ", key_sep = ": ";
  };
  void append_json_str(std::string& o, std::string_view s, bool ascii) {
    o += '"';
    for (size_t i = 0; i < s.size();) {
      unsigned char c = static_cast<unsigned char>(s[i]);
      if (c == '"') { o += "\\\""; ++i; }
      else if (c == '\\') { o += "\\\\"; ++i; }
      else if (c == '\n') { o += "\\n"; ++i; }
      else if (c == '\r') { o += "\\r"; ++i; }
      else if (c == '\t') { o += "\\t"; ++i; }
      else if (c == '\b') { o += "\\b"; ++i; }
      else if (c == '\f') { o += "\\f"; ++i; }
      else if (c < 0x20 || (ascii && c == 0x7F)) {
        char b[8];
        std::snprintf(b, sizeof b, "\\u%04x", c);
        o += b;
        ++i;
      } else if (c >= 0x80 && ascii) {
        size_t n;
        uint32_t cp = decode_at(s, i, &n);
        i += n;
        char b[16];
        if (cp >= 0x10000) {
          cp -= 0x10000;
          std::snprintf(b, sizeof b, "\\u%04x\\u%04x", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
        } else {
          std::snprintf(b, sizeof b, "\\u%04x", cp);
        }
        o += b;
      } else {
        o += char(c);
        ++i;
      }
    }
    o += '"';
  }
  void append_json(std::string& o, const Value& v, const JsonOpts& opt, int level, const Expr& at) {
    if (level > 512) err(at, "tojson: value nested too deeply");
    auto newline = [&](int lv) {
      // Indents multiply (depth x items): checked as they are written, not after.
      if (o.size() + 1 + static_cast<size_t>(lv) * opt.indent.size() > kMaxOutputBytes) err(at, "string larger than 64 MiB");
      o += '\n';
      for (int k = 0; k < lv; ++k) o += opt.indent;
    };
    switch (v.k) {
      case K::None: o += "null"; return;
      case K::Bool: o += v.u.b ? "true" : "false"; return;
      case K::Int: o += std::to_string(v.u.i); return;
      case K::Float:
        if (std::isnan(v.u.d)) o += "NaN";
        else if (std::isinf(v.u.d)) o += v.u.d < 0 ? "-Infinity" : "Infinity";
        else append_float(o, v.u.d);
        return;
      case K::Str: append_json_str(o, v.s, opt.ensure_ascii); return;
      case K::List: case K::JArr: {
        size_t n = list_size(v);
        if (n == 0) { o += "[]"; return; }
        o += '[';
        for (size_t i = 0; i < n; ++i) {
          if (i) o += opt.item_sep;
          if (opt.has_indent) newline(level + 1);
          append_json(o, list_at(v, i), opt, level + 1, at);
        }
        if (opt.has_indent) newline(level);
        o += ']';
        return;
      }
      case K::Dict: case K::JObj: {
        std::vector<std::pair<Value, Value>> items;
        dict_each(v, [&](const Value& k, const Value& x) { items.emplace_back(k, x); });
        if (items.empty()) { o += "{}"; return; }
        if (opt.sort_keys)
          std::stable_sort(items.begin(), items.end(), [](const auto& a, const auto& b) { return a.first.s < b.first.s; });
        o += '{';
        for (size_t i = 0; i < items.size(); ++i) {
          if (i) o += opt.item_sep;
          if (opt.has_indent) newline(level + 1);
          append_json_str(o, items[i].first.s, opt.ensure_ascii);
          o += opt.key_sep;
          append_json(o, items[i].second, opt, level + 1, at);
        }
        if (opt.has_indent) newline(level);
        o += '}';
        return;
      }
      default: err(at, std::string("Object of type ") + type_name(v) + " is not JSON serializable");
    }
  }

  // --- comparisons and arithmetic
  static bool num(const Value& v, double* d) {
    if (v.k == K::Int) { *d = static_cast<double>(v.u.i); return true; }
    if (v.k == K::Float) { *d = v.u.d; return true; }
    if (v.k == K::Bool) { *d = v.u.b; return true; }
    return false;
  }
  static bool intlike(const Value& v, int64_t* i) {
    if (v.k == K::Int) { *i = v.u.i; return true; }
    if (v.k == K::Bool) { *i = v.u.b; return true; }
    return false;
  }
  bool equal(const Value& a, const Value& b) {
    if (a.is_num() && b.is_num()) {
      int64_t x, y;
      if (intlike(a, &x) && intlike(b, &y)) return x == y;
      double p, q;
      num(a, &p);
      num(b, &q);
      return p == q;
    }
    if (a.k == K::Str && b.k == K::Str) return a.s == b.s;
    if (a.k == K::None || b.k == K::None) return a.k == b.k;
    if (a.k == K::Undef || b.k == K::Undef) return a.k == b.k;
    if (a.is_list() && b.is_list()) {
      bool ta = a.k == K::List && list_obj(a).tuple, tb = b.k == K::List && list_obj(b).tuple;
      if (ta != tb) return false;
      size_t n = list_size(a);
      if (n != list_size(b)) return false;
      for (size_t i = 0; i < n; ++i)
        if (!equal(list_at(a, i), list_at(b, i))) return false;
      return true;
    }
    if (a.is_dict() && b.is_dict()) {
      if (dict_size(a) != dict_size(b)) return false;
      bool eq = true;
      dict_each(a, [&](const Value& k, const Value& x) {
        Value y;
        if (eq && (!dict_get(b, k.s, &y) || !equal(x, y))) eq = false;
      });
      return eq;
    }
    if (a.k == b.k && a.o) return a.o == b.o;
    return false;
  }
  // Python ordering: <0, 0, >0; error for unorderable types.
  int compare(const Value& a, const Value& b, const Expr& at, const char* op) {
    if (a.is_num() && b.is_num()) {
      int64_t x, y;
      if (intlike(a, &x) && intlike(b, &y)) return x < y ? -1 : x > y ? 1 : 0;
      double p, q;
      num(a, &p);
      num(b, &q);
      return p < q ? -1 : p > q ? 1 : 0;
    }
    if (a.k == K::Str && b.k == K::Str) {
      int c = a.s.compare(b.s);
      return c < 0 ? -1 : c > 0 ? 1 : 0;
    }
    if (a.is_list() && b.is_list()) {
      size_t n = list_size(a), m = list_size(b);
      for (size_t i = 0; i < n && i < m; ++i) {
        Value x = list_at(a, i), y = list_at(b, i);
        if (!equal(x, y)) return compare(x, y, at, op);
      }
      return n < m ? -1 : n > m ? 1 : 0;
    }
    if (a.k == K::Undef) undefined_error(at, a);
    if (b.k == K::Undef) undefined_error(at, b);
    err(at, std::string("'") + op + "' not supported between instances of '" + type_name(a) + "' and '" + type_name(b) + "'");
  }
  bool contains(const Value& hay, const Value& needle, const Expr& at) {
    switch (hay.k) {
      case K::Str:
        if (needle.k != K::Str) err(at, std::string("'in <string>' requires string as left operand, not ") + type_name(needle));
        return hay.s.find(needle.s) != std::string_view::npos;
      case K::List: case K::JArr: {
        size_t n = list_size(hay);
        for (size_t i = 0; i < n; ++i)
          if (equal(list_at(hay, i), needle)) return true;
        return false;
      }
      case K::Dict: case K::JObj: {
        if (needle.k != K::Str) return false;
        Value tmp;
        return dict_get(hay, needle.s, &tmp);
      }
      case K::Undef: return false;
      default: err(at, std::string("argument of type '") + type_name(hay) + "' is not iterable");
    }
  }
  Value checked_str(std::string s, const Expr& at) {
    if (s.size() > kMaxOutputBytes) err(at, "string larger than 64 MiB");
    return Value::str(std::move(s));
  }
  Value arith(Op op, const Value& a, const Value& b, const Expr& at) {
    if (a.k == K::Undef) undefined_error(at, a);
    if (b.k == K::Undef) undefined_error(at, b);
    static const char* names[] = {"+", "-", "*", "/", "//", "%", "**"};
    const char* on = names[static_cast<int>(op)];
    if (op == Op::Add) {
      if (a.k == K::Str && b.k == K::Str) {
        if (a.markup || b.markup) {
          std::string s = a.markup ? std::string(a.s) : html_escape(a.s);
          s += b.markup ? std::string(b.s) : html_escape(b.s);
          Value r = checked_str(std::move(s), at);
          r.markup = true;
          return r;
        }
        if (a.s.size() + b.s.size() > kMaxOutputBytes) err(at, "string larger than 64 MiB");
        std::string s;
        s.reserve(a.s.size() + b.s.size());
        s.append(a.s).append(b.s);
        return checked_str(std::move(s), at);
      }
      if (a.is_list() && b.is_list()) {
        // Lists are capped as strings are: doubling one through a namespace or recursion would
        // otherwise reach 2^40 items under the other limits.
        if (list_size(a) + list_size(b) > kMaxListItems) err(at, "list longer than 10 million items");
        std::vector<Value> v;
        for (size_t i = 0, n = list_size(a); i < n; ++i) v.push_back(list_at(a, i));
        for (size_t i = 0, n = list_size(b); i < n; ++i) v.push_back(list_at(b, i));
        bool tup = a.k == K::List && list_obj(a).tuple;
        bool tupb = b.k == K::List && list_obj(b).tuple;
        if (tup != tupb) err(at, std::string("can only concatenate ") + type_name(a) + " (not \"" + type_name(b) + "\") to " + type_name(a));
        return make_list(std::move(v), tup);
      }
    }
    if (op == Op::Mul) {
      int64_t n;
      const Value* seq = nullptr;
      if (a.k == K::Str && intlike(b, &n)) seq = &a;
      else if (b.k == K::Str && intlike(a, &n)) seq = &b;
      if (seq) {
        if (n <= 0) return Value::view("");
        if (static_cast<double>(n) * static_cast<double>(seq->s.size()) > static_cast<double>(kMaxOutputBytes)) err(at, "string larger than 64 MiB");
        std::string s;
        for (int64_t k = 0; k < n; ++k) s.append(seq->s);
        return Value::str(std::move(s));
      }
      const Value* lst = nullptr;
      if (a.is_list() && intlike(b, &n)) lst = &a;
      else if (b.is_list() && intlike(a, &n)) lst = &b;
      if (lst) {
        std::vector<Value> v;
        size_t m = list_size(*lst);
        if (n > 0 && static_cast<double>(n) * static_cast<double>(m) > 1e7) err(at, "list too large");
        for (int64_t k = 0; k < n; ++k)
          for (size_t i = 0; i < m; ++i) v.push_back(list_at(*lst, i));
        return make_list(std::move(v));
      }
    }
    if (op == Op::Mod && a.k == K::Str) return percent_format(a, b, at);
    if (!a.is_num() || !b.is_num())
      err(at, std::string("unsupported operand type(s) for ") + on + ": '" + type_name(a) + "' and '" + type_name(b) + "'");
    int64_t x, y;
    if (intlike(a, &x) && intlike(b, &y)) {
      int64_t r;
      switch (op) {
        case Op::Add: if (__builtin_add_overflow(x, y, &r)) err(at, "integer overflow"); return Value::integer(r);
        case Op::Sub: if (__builtin_sub_overflow(x, y, &r)) err(at, "integer overflow"); return Value::integer(r);
        case Op::Mul: if (__builtin_mul_overflow(x, y, &r)) err(at, "integer overflow"); return Value::integer(r);
        case Op::Div:
          if (y == 0) err(at, "division by zero");
          return Value::flt(static_cast<double>(x) / static_cast<double>(y));
        case Op::FloorDiv: {
          if (y == 0) err(at, "integer division or modulo by zero");
          int64_t q = x / y;
          if ((x % y != 0) && ((x < 0) != (y < 0))) --q;
          return Value::integer(q);
        }
        case Op::Mod: {
          if (y == 0) err(at, "integer division or modulo by zero");
          int64_t m = x % y;
          if (m != 0 && ((m < 0) != (y < 0))) m += y;
          return Value::integer(m);
        }
        case Op::Pow: {
          if (y < 0) return Value::flt(std::pow(static_cast<double>(x), static_cast<double>(y)));
          int64_t res = 1, base = x;
          for (int64_t e = y; e > 0; e >>= 1) {
            if (e & 1)
              if (__builtin_mul_overflow(res, base, &res)) err(at, "integer overflow");
            if (e > 1 && __builtin_mul_overflow(base, base, &base)) err(at, "integer overflow");
          }
          return Value::integer(res);
        }
        default: break;
      }
    }
    double p, q;
    num(a, &p);
    num(b, &q);
    switch (op) {
      case Op::Add: return Value::flt(p + q);
      case Op::Sub: return Value::flt(p - q);
      case Op::Mul: return Value::flt(p * q);
      case Op::Div: if (q == 0) err(at, "float division by zero"); return Value::flt(p / q);
      case Op::FloorDiv: if (q == 0) err(at, "float floor division by zero"); return Value::flt(std::floor(p / q));
      case Op::Mod: {
        if (q == 0) err(at, "float modulo");
        double m = std::fmod(p, q);
        if (m != 0 && ((m < 0) != (q < 0))) m += q;
        return Value::flt(m);
      }
      case Op::Pow: return Value::flt(std::pow(p, q));
      default: break;
    }
    err(at, "bad operator");
  }
  // Python's printf-style `fmt % args`: flags (-, 0, +, space), width, precision and the conversions
  // s r d i f F e E g G x X o c %; a mapping key (%(name)s) is refused.
  Value percent_format(const Value& fmt, const Value& args, const Expr& at) {
    std::vector<Value> xs;
    if (args.k == K::List && list_obj(args).tuple) xs = list_obj(args).v;
    else xs.push_back(args);
    std::string o;
    size_t ai = 0;
    std::string_view f = fmt.s;
    for (size_t i = 0; i < f.size(); ++i) {
      char c = f[i];
      if (c != '%') { o += c; continue; }
      if (++i >= f.size()) err(at, "incomplete format");
      if (f[i] == '%') { o += '%'; continue; }
      if (f[i] == '(') err(at, "format: mapping keys (%(name)s) are not supported");
      std::string spec = "%";
      bool left = false, zero = false;
      while (i < f.size() && std::strchr("-0+ #", f[i])) {
        if (f[i] == '-') left = true;
        if (f[i] == '0') zero = true;
        spec += f[i++];
      }
      int width = -1, prec = -1;
      auto number = [&](int* out) {
        if (i < f.size() && f[i] == '*') err(at, "format: '*' width is not supported");
        if (i < f.size() && std::isdigit(static_cast<unsigned char>(f[i]))) {
          *out = 0;
          while (i < f.size() && std::isdigit(static_cast<unsigned char>(f[i]))) {
            *out = std::min(*out * 10 + (f[i] - '0'), 10000);
            spec += f[i++];
          }
        }
      };
      number(&width);
      if (i < f.size() && f[i] == '.') {
        spec += f[i++];
        prec = 0;
        number(&prec);
      }
      if (i >= f.size()) err(at, "incomplete format");
      char conv = f[i];
      if (ai >= xs.size()) err(at, "not enough arguments for format string");
      const Value& x = xs[ai++];
      std::string piece;
      if (conv == 's' || conv == 'r' || conv == 'a') {
        if (conv == 's') append_str(piece, x);
        else append_repr(piece, x, 0);
        if (prec >= 0 && cp_count(piece) > static_cast<size_t>(prec)) piece = piece.substr(0, cp_offsets(piece)[static_cast<size_t>(prec)]);
        size_t n = cp_count(piece);
        if (width > 0 && n < static_cast<size_t>(width)) {
          std::string pad(static_cast<size_t>(width) - n, ' ');
          piece = left ? piece + pad : pad + piece;
        }
      } else if (conv == 'c') {
        int64_t code;
        if (x.k == K::Str && cp_count(x.s) == 1) piece = std::string(x.s);
        else if (intlike(x, &code) && code >= 0 && code <= 0x10FFFF) append_utf8(piece, static_cast<uint32_t>(code));
        else err(at, "%c requires an int or a single character");
      } else if (std::strchr("diouxX", conv)) {
        double d;
        int64_t iv;
        if (!intlike(x, &iv)) {
          if (!num(x, &d) || !std::isfinite(d)) err(at, std::string("%") + conv + " format: a real number is required, not " + type_name(x));
          if (conv != 'd' && conv != 'i' && conv != 'u') err(at, std::string("%") + conv + " format: an integer is required, not float");
          if (!fits_int64(d)) err(at, "%d format: the number does not fit 64 bits");
          iv = static_cast<int64_t>(d);
        }
        spec += "ll";
        spec += conv == 'i' || conv == 'u' ? 'd' : conv;
        char buf[128];
        std::snprintf(buf, sizeof buf, spec.c_str(), static_cast<long long>(iv));
        piece = buf;
        if (conv == 'o' && spec.find('#') != std::string::npos) piece.insert(piece.find('0'), "o");
      } else if (std::strchr("fFeEgG", conv)) {
        double d;
        if (!num(x, &d)) err(at, std::string("%") + conv + " format: a real number is required, not " + type_name(x));
        spec += conv;
        std::vector<char> buf(static_cast<size_t>(std::max(width, 0)) + 400);
        std::snprintf(buf.data(), buf.size(), spec.c_str(), d);
        piece = buf.data();
        (void)zero;
      } else {
        err(at, std::string("unsupported format character '") + conv + "'");
      }
      o += piece;
    }
    if (ai < xs.size()) err(at, "not all arguments converted during string formatting");
    return Value::str(std::move(o));
  }

  // --- lookups
  Value lookup_name(const Expr& e, const Frame& f) {
    if (const Value* v = f.find(e.name)) return *v;
    if (ctx_.IsObject()) {
      for (auto it = ctx_.MemberBegin(); it != ctx_.MemberEnd(); ++it)
        if (it->name.GetStringLength() == e.name.size() && std::memcmp(it->name.GetString(), e.name.data(), e.name.size()) == 0)
          return Value::json(it->value);
    }
    const std::string& n = e.name;
    if (n == "range") return make_func(Fn::Range);
    if (n == "namespace") return make_func(Fn::Namespace);
    if (n == "dict") return make_func(Fn::Dict);
    if (n == "raise_exception") return make_func(Fn::RaiseException);
    // strftime_now formats the current local time: templates that call it (Llama 3.x's "Today
    // Date") render differently from one day to the next, exactly as in transformers.
    if (n == "strftime_now") return make_func(Fn::StrftimeNow);
    return Value::undef(e.name);
  }
  Value method(const Value& self, std::string_view name) {
    auto f = std::make_shared<FuncObj>();
    f->fn = Fn::Method;
    f->self = self;
    f->name = name;
    Value v;
    v.k = K::Func;
    v.o = std::move(f);
    return v;
  }
  static bool has_method(const Value& obj, uint8_t mask) {
    return (obj.k == K::Str && (mask & kStrMethod)) || (obj.is_dict() && (mask & kDictMethod)) ||
           (obj.is_list() && (mask & kListMethod));
  }
  static bool has_method(const Value& obj, std::string_view name) { return has_method(obj, method_mask(name)); }
  // obj.name: Python attribute first, then item (jinja2's getattr).
  Value get_attr(const Value& obj, std::string_view name, const Expr& at) { return get_attr(obj, name, method_mask(name), at); }
  Value get_attr(const Value& obj, std::string_view name, uint8_t mask, const Expr& at) {
    switch (obj.k) {
      case K::Undef: undefined_error(at, obj);
      case K::Dict: case K::JObj: {
        if (mask & kDictMethod) return method(obj, name);
        Value v;
        if (dict_get(obj, name, &v)) return v;
        return Value::undef(name, 1, 0);
      }
      case K::NS: {
        const Value* p = dict_obj(obj).find(name);
        return p ? *p : Value::undef(name, 1, 7);
      }
      case K::Loop: return loop_attr(obj, name, at);
      default:
        if (has_method(obj, mask)) return method(obj, name);
        return Value::undef(name, 1, static_cast<uint8_t>(type_code(obj)));
    }
  }
  // obj[key]: item first, then attribute (jinja2's getitem). An undefined result keeps the key's text alive.
  Value get_item(const Value& obj, const Value& key, const Expr& at) {
    Value r = get_item_raw(obj, key, at);
    if ((r.k == K::Undef || r.k == K::Func) && key.k == K::Str && key.o && !r.o) r.o = key.o;
    return r;
  }
  Value get_item_raw(const Value& obj, const Value& key, const Expr& at) {
    switch (obj.k) {
      case K::Undef: undefined_error(at, obj);
      case K::Dict: case K::JObj: {
        if (key.k == K::Str) {
          Value v;
          if (dict_get(obj, key.s, &v)) return v;
          if (is_dict_method(key.s)) return method(obj, key.s);
          return Value::undef(key.s, 1, 0);
        }
        return Value::undef("", 1, 0);
      }
      case K::NS:
        if (key.k == K::Str) return get_attr(obj, key.s, at);
        return Value::undef();
      case K::List: case K::JArr: {
        int64_t i;
        if (intlike(key, &i)) {
          int64_t n = static_cast<int64_t>(list_size(obj)), orig = i;
          if (i < 0) i += n;
          if (i < 0 || i >= n) return no_element(1, orig);
          return list_at(obj, static_cast<size_t>(i));
        }
        if (key.k == K::Str) return get_attr(obj, key.s, at);
        return Value::undef();
      }
      case K::Str: {
        int64_t i;
        if (intlike(key, &i)) {
          if (is_ascii(obj.s)) {
            int64_t n = static_cast<int64_t>(obj.s.size()), orig = i;
            if (i < 0) i += n;
            if (i < 0 || i >= n) return no_element(2, orig);
            return Value::view(obj.s.substr(static_cast<size_t>(i), 1), obj.o);
          }
          auto off = cp_offsets(obj.s);
          int64_t n = static_cast<int64_t>(off.size()) - 1, orig = i;
          if (i < 0) i += n;
          if (i < 0 || i >= n) return no_element(2, orig);
          return Value::view(obj.s.substr(off[static_cast<size_t>(i)], off[static_cast<size_t>(i) + 1] - off[static_cast<size_t>(i)]), obj.o);
        }
        if (key.k == K::Str) return get_attr(obj, key.s, at);
        return Value::undef();
      }
      case K::Loop:
        if (key.k == K::Str) return loop_attr(obj, key.s, at);
        return Value::undef();
      default: return Value::undef();
    }
  }
  // Python slice indices for a sequence of length n.
  static void slice_indices(int64_t n, const Value* s0, const Value* s1, const Value* s2, std::vector<int64_t>* idx,
                            const Expr& at, Renderer* r) {
    int64_t step = 1;
    auto as_int = [&](const Value* v, int64_t* out) -> bool {
      if (!v || v->k == K::None) return false;
      if (!intlike(*v, out)) r->err(at, "slice indices must be integers or None");
      return true;
    };
    int64_t x;
    if (as_int(s2, &x)) {
      if (x == 0) r->err(at, "slice step cannot be zero");
      step = x;
    }
    int64_t start, stop;
    if (step > 0) {
      start = 0;
      stop = n;
      if (as_int(s0, &x)) start = x < 0 ? std::max<int64_t>(x + n, 0) : std::min(x, n);
      if (as_int(s1, &x)) stop = x < 0 ? std::max<int64_t>(x + n, 0) : std::min(x, n);
      for (int64_t i = start; i < stop;) {  // no signed overflow past stop with a huge step
        idx->push_back(i);
        if (__builtin_add_overflow(i, step, &i)) break;
      }
    } else {
      start = n - 1;
      stop = -1;
      if (as_int(s0, &x)) start = x < 0 ? std::max<int64_t>(x + n, -1) : std::min(x, n - 1);
      if (as_int(s1, &x)) stop = x < 0 ? std::max<int64_t>(x + n, -1) : std::min(x, n - 1);
      for (int64_t i = start; i > stop;) {
        idx->push_back(i);
        if (__builtin_add_overflow(i, step, &i)) break;
      }
    }
  }
  Value slice(const Value& obj, const Value* s0, const Value* s1, const Value* s2, const Expr& at) {
    if (obj.k == K::Undef) undefined_error(at, obj);
    std::vector<int64_t> idx;
    if (obj.k == K::Str) {
      bool ascii = is_ascii(obj.s);
      std::vector<size_t> off;
      if (!ascii) off = cp_offsets(obj.s);
      int64_t n = ascii ? static_cast<int64_t>(obj.s.size()) : static_cast<int64_t>(off.size()) - 1;
      slice_indices(n, s0, s1, s2, &idx, at, this);
      auto b = [&](int64_t i) { return ascii ? static_cast<size_t>(i) : off[static_cast<size_t>(i)]; };
      bool contiguous = true;
      for (size_t k = 1; k < idx.size(); ++k)
        if (idx[k] != idx[k - 1] + 1) contiguous = false;
      if (idx.empty()) return Value::view("");
      if (contiguous) {
        size_t from = b(idx.front()), to = b(idx.back() + 1);
        return Value::view(obj.s.substr(from, to - from), obj.o);
      }
      std::string s;
      for (int64_t i : idx) s.append(obj.s.substr(b(i), b(i + 1) - b(i)));
      return Value::str(std::move(s));
    }
    if (obj.is_list()) {
      slice_indices(static_cast<int64_t>(list_size(obj)), s0, s1, s2, &idx, at, this);
      std::vector<Value> v;
      v.reserve(idx.size());
      for (int64_t i : idx) v.push_back(list_at(obj, static_cast<size_t>(i)));
      return make_list(std::move(v), obj.k == K::List && list_obj(obj).tuple);
    }
    err(at, std::string("'") + type_name(obj) + "' object is not subscriptable");
  }
  // Iteration: the values `for x in v` gives.
  void iterate(const Value& v, std::vector<Value>* items, const Expr& at) {
    switch (v.k) {
      case K::Undef: return;
      case K::List: *items = list_obj(v).v; return;
      case K::JArr:
        items->reserve(v.u.j->Size());
        for (const auto& x : v.u.j->GetArray()) items->push_back(Value::json(x));
        return;
      case K::Dict: case K::JObj:
        dict_each(v, [&](const Value& k, const Value&) { items->push_back(k); });
        return;
      case K::Str:
        for (size_t i = 0; i < v.s.size();) {
          size_t n;
          decode_at(v.s, i, &n);
          items->push_back(Value::view(v.s.substr(i, n), v.o));
          i += n;
        }
        return;
      default: err(at, std::string("'") + type_name(v) + "' object is not iterable");
    }
  }
  int64_t length(const Value& v, const Expr& at) {
    switch (v.k) {
      case K::Undef: return 0;
      case K::Str: return static_cast<int64_t>(cp_count(v.s));
      case K::List: case K::JArr: return static_cast<int64_t>(list_size(v));
      case K::Dict: case K::JObj: return static_cast<int64_t>(dict_size(v));
      default: err(at, std::string("object of type '") + type_name(v) + "' has no len()");
    }
  }
  Value loop_attr(const Value& lv, std::string_view n, const Expr& at) {
    auto& l = static_cast<LoopObj&>(*lv.o);
    (void)at;
    if (n == "index") return Value::integer(l.index0 + 1);
    if (n == "index0") return Value::integer(l.index0);
    if (n == "first") return Value::boolean(l.index0 == 0);
    if (n == "last") return Value::boolean(l.index0 == l.length - 1);
    if (n == "length") return Value::integer(l.length);
    if (n == "revindex") return Value::integer(l.length - l.index0);
    if (n == "revindex0") return Value::integer(l.length - l.index0 - 1);
    if (n == "depth") return Value::integer(1);
    if (n == "depth0") return Value::integer(0);
    if (n == "previtem") return l.index0 > 0 ? l.items[static_cast<size_t>(l.index0 - 1)] : Value::undef("there is no previous item");
    if (n == "nextitem") return l.index0 + 1 < l.length ? l.items[static_cast<size_t>(l.index0 + 1)] : Value::undef("there is no next item");
    if (n == "cycle" || n == "changed") {
      auto f = std::make_shared<FuncObj>();
      f->fn = n == "cycle" ? Fn::LoopCycle : Fn::LoopChanged;
      f->self = lv;
      Value v;
      v.k = K::Func;
      v.o = std::move(f);
      return v;
    }
    return Value::undef(n, 1, 7);
  }

  // --- evaluation
  Value eval(const Expr& e, Frame& f);
  // a + b + c + ...: left to right as Python does, but strings are appended into one buffer instead
  // of building each intermediate string (chat templates chain a dozen pieces per message).
  Value eval_add_chain(const Expr& e, Frame& f) {
    const Expr* operands[64];
    const Expr* nodes[64];
    size_t n = 0;
    const Expr* cur = &e;
    while (cur->kind == E::Bin && cur->ops[0] == Op::Add && n < 63) {
      nodes[n] = cur;
      operands[n++] = cur->a[1].get();
      cur = cur->a[0].get();
    }
    // operands[n-1..0] are the right-hand sides in source order; `cur` is the leftmost operand.
    Value acc = eval(*cur, f);
    std::string buf;
    bool buffering = false;
    for (size_t k = n; k-- > 0;) {
      Value r = eval(*operands[k], f);
      const Expr& at = *nodes[k];
      if (acc.k == K::Str && !acc.markup && r.k == K::Str && !r.markup) {
        if (!buffering) {
          buf.assign(acc.s);
          buffering = true;
        }
        if (buf.size() + r.s.size() > kMaxOutputBytes) err(at, "string larger than 64 MiB");
        buf.append(r.s);
        acc.s = std::string_view();  // stands for `buf` until materialised
        continue;
      }
      if (buffering) {
        acc = Value::str(std::move(buf));
        buf.clear();
        buffering = false;
      }
      acc = arith(Op::Add, acc, r, at);
    }
    if (buffering) return Value::str(std::move(buf));
    return acc;
  }
  Value call(const Expr& e, Frame& f);
  Value call_value(const Value& fn, Args& pos, std::vector<std::pair<std::string_view, Value>>& kw, const Expr& at, Frame& f);
  Value call_method(const Value& self, std::string_view name, Args& pos, std::vector<std::pair<std::string_view, Value>>& kw, const Expr& at);
  Value call_macro(const FuncObj& fo, Args& pos, std::vector<std::pair<std::string_view, Value>>& kw, const Expr& at);
  Value apply_filter(int id, const Value& v, Args& pos, std::vector<std::pair<std::string_view, Value>>& kw, const Expr& at, Frame& f);
  bool apply_test(int id, const Value& v, Args& pos, const Expr& at, Frame& f);
  void eval_args(const Expr& e, size_t first, Frame& f, Args* pos, std::vector<std::pair<std::string_view, Value>>* kw) {
    for (size_t i = first; i < e.a.size(); ++i) pos->push_back(eval(*e.a[i], f));
    for (const auto& kv : e.kw) kw->emplace_back(kv.first, eval(*kv.second, f));
  }

  // The variables visible from `f` below the top level, flattened (inner names win): what a macro
  // defined (or a caller body run) there sees, kept alive for as long as the macro value lives.
  std::shared_ptr<Frame> snapshot(const Frame& f) {
    auto c = std::make_shared<Frame>();
    c->parent = &root_;
    for (const Frame* p = &f; p && p != &root_; p = p->parent)
      for (const auto& kv : p->vars) {
        bool shadowed = false;
        for (const auto& have : c->vars)
          if (have.first == kv.first) shadowed = true;
        if (!shadowed) c->vars.push_back(kv);
      }
    return c;
  }

  // --- statements
  Flow exec(const Body& body, Frame& f);
  Flow exec_for(const Stmt& s, Frame& f);
  void assign(const Target& tg, const Value& v, Frame& f, const Stmt& at);
  std::string capture(const Body& body, Frame& f) {
    std::string tmp;
    std::string* saved = buf_;
    buf_ = &tmp;
    try {
      exec(body, f);
    } catch (...) {
      buf_ = saved;
      throw;
    }
    buf_ = saved;
    return tmp;
  }
  void count_iteration(int line) {
    if (++iterations_ > kMaxLoopIterations)
      throw TemplateError{line, 0, "more than " + std::to_string(kMaxLoopIterations) + " loop iterations in one rendering: refusing to render further"};
  }

  const Template::Impl& t_;
  const rapidjson::Value& ctx_;
  std::string top_;
  std::string* buf_ = &top_;
  std::vector<std::pair<size_t, size_t>> gen_;
  Frame root_;
  int call_depth_ = 0;
  int eval_depth_ = 0;
  int64_t iterations_ = 0;
  int cur_line_ = 0;
};

}  // namespace

struct Template::Impl {
  std::string source;
  std::string origin;
  Body body;
  bool has_generation = false;
};

namespace {

// Python argument binding for builtins: positional then keywords by name.
struct Binder {
  Args& pos;
  std::vector<std::pair<std::string_view, Value>>& kw;
  const Expr& at;
  Renderer* r;
  const char* fname;
  std::vector<const char*> names;
  // Returns the argument `i` (named names[i]) or nullptr.
  const Value* get(size_t i) {
    if (i < pos.size()) return &pos[i];
    for (auto& kv : kw)
      if (kv.first == names[i]) return &kv.second;
    return nullptr;
  }
};

}  // namespace

namespace {

struct EvalDepth {
  int& d;
  EvalDepth(int& depth, int line, int col) : d(depth) {
    if (++d > kMaxEvalDepth) {
      --d;
      fail(line, col, "template evaluation nested deeper than " + std::to_string(kMaxEvalDepth) + " levels (runaway recursion?)");
    }
  }
  ~EvalDepth() { --d; }
};

Value Renderer::eval(const Expr& e, Frame& f) {
  EvalDepth guard(eval_depth_, e.line, e.col);
  switch (e.kind) {
    case E::Const: return e.constant;
    case E::Name: return lookup_name(e, f);
    case E::GetAttr: return get_attr(eval(*e.a[0], f), e.name, e.methods, e);
    case E::GetItem: {
      Value o = eval(*e.a[0], f);
      return get_item(o, eval(*e.a[1], f), e);
    }
    case E::Slice: {
      Value o = eval(*e.a[0], f);
      Value p[3];
      for (int k = 0; k < 3; ++k)
        if (e.has_slice_part[k]) p[k] = eval(*e.a[1 + k], f);
      return slice(o, e.has_slice_part[0] ? &p[0] : nullptr, e.has_slice_part[1] ? &p[1] : nullptr,
                   e.has_slice_part[2] ? &p[2] : nullptr, e);
    }
    case E::Call: return call(e, f);
    case E::Filter: {
      Value v = eval(*e.a[0], f);
      Args pos;
      std::vector<std::pair<std::string_view, Value>> kw;
      eval_args(e, 1, f, &pos, &kw);
      return apply_filter(e.id, v, pos, kw, e, f);
    }
    case E::Test: {
      Value v = eval(*e.a[0], f);
      Args pos;
      std::vector<std::pair<std::string_view, Value>> kw;
      eval_args(e, 1, f, &pos, &kw);
      bool r = apply_test(e.id, v, pos, e, f);
      return Value::boolean(e.negated ? !r : r);
    }
    case E::Neg: case E::Pos: {
      Value v = eval(*e.a[0], f);
      if (v.k == K::Undef) undefined_error(e, v);
      if (e.kind == E::Pos && v.is_num()) return v.k == K::Bool ? Value::integer(v.u.b) : v;
      if (v.k == K::Int) {
        if (v.u.i == std::numeric_limits<int64_t>::min()) err(e, "integer overflow");
        return Value::integer(-v.u.i);
      }
      if (v.k == K::Bool) return Value::integer(-int64_t(v.u.b));
      if (v.k == K::Float) return Value::flt(-v.u.d);
      err(e, std::string("bad operand type for unary ") + (e.kind == E::Neg ? "-" : "+") + ": '" + type_name(v) + "'");
    }
    case E::Not: return Value::boolean(!truthy(eval(*e.a[0], f)));
    case E::And: {
      Value l = eval(*e.a[0], f);
      if (!truthy(l)) return l;
      return eval(*e.a[1], f);
    }
    case E::Or: {
      Value l = eval(*e.a[0], f);
      if (truthy(l)) return l;
      return eval(*e.a[1], f);
    }
    case E::Bin: {
      if (e.ops[0] == Op::Add) return eval_add_chain(e, f);
      Value l = eval(*e.a[0], f);
      Value r = eval(*e.a[1], f);
      return arith(e.ops[0], l, r, e);
    }
    case E::Compare: {
      Value l = eval(*e.a[0], f);
      for (size_t i = 0; i < e.ops.size(); ++i) {
        Value r = eval(*e.a[i + 1], f);
        bool ok;
        switch (e.ops[i]) {
          case Op::Eq: ok = equal(l, r); break;
          case Op::Ne: ok = !equal(l, r); break;
          case Op::Lt: ok = compare(l, r, e, "<") < 0; break;
          case Op::Le: ok = compare(l, r, e, "<=") <= 0; break;
          case Op::Gt: ok = compare(l, r, e, ">") > 0; break;
          case Op::Ge: ok = compare(l, r, e, ">=") >= 0; break;
          case Op::In: ok = contains(r, l, e); break;
          case Op::NotIn: ok = !contains(r, l, e); break;
          default: ok = false;
        }
        if (!ok) return Value::boolean(false);
        l = std::move(r);
      }
      return Value::boolean(true);
    }
    case E::Concat: {
      std::string s;
      for (const auto& x : e.a) {
        Value v = eval(*x, f);
        if (v.k == K::Str && s.size() + v.s.size() > kMaxOutputBytes) err(e, "string larger than 64 MiB");
        append_str(s, v);
      }
      return checked_str(std::move(s), e);
    }
    case E::Cond: {
      if (truthy(eval(*e.a[0], f))) return eval(*e.a[1], f);
      if (e.a[2]) return eval(*e.a[2], f);
      return Value::undef();
    }
    case E::ListLit: case E::TupleLit: {
      std::vector<Value> v;
      v.reserve(e.a.size());
      for (const auto& x : e.a) v.push_back(eval(*x, f));
      return make_list(std::move(v), e.kind == E::TupleLit);
    }
    case E::DictLit: {
      auto d = std::make_shared<DictObj>();
      for (size_t i = 0; i + 1 < e.a.size(); i += 2) {
        Value k = eval(*e.a[i], f);
        if (k.k != K::Str) err(*e.a[i], "dict keys other than strings are not supported");
        d->set(k, eval(*e.a[i + 1], f));
      }
      return make_dict(std::move(d));
    }
  }
  err(e, "unsupported expression");
}

Value Renderer::call(const Expr& e, Frame& f) {
  const Expr& callee = *e.a[0];
  Args pos;
  std::vector<std::pair<std::string_view, Value>> kw;
  if (callee.kind == E::GetAttr) {
    // obj.method(...) without building a bound method.
    Value self = eval(*callee.a[0], f);
    if (self.k == K::Undef) undefined_error(callee, self);
    if (has_method(self, callee.methods)) {
      eval_args(e, 1, f, &pos, &kw);
      return call_method(self, callee.name, pos, kw, e);
    }
    Value fn = get_attr(self, callee.name, callee.methods, callee);
    eval_args(e, 1, f, &pos, &kw);
    return call_value(fn, pos, kw, e, f);
  }
  Value fn = eval(callee, f);
  eval_args(e, 1, f, &pos, &kw);
  return call_value(fn, pos, kw, e, f);
}

Value Renderer::call_value(const Value& fn, Args& pos, std::vector<std::pair<std::string_view, Value>>& kw,
                           const Expr& at, Frame& f) {
  (void)f;
  if (fn.k == K::Undef) undefined_error(at, fn);
  if (fn.k != K::Func) err(at, std::string("'") + type_name(fn) + "' object is not callable");
  const FuncObj& fo = func_obj(fn);
  switch (fo.fn) {
    case Fn::Method: return call_method(fo.self, fo.name, pos, kw, at);
    case Fn::Macro: return call_macro(fo, pos, kw, at);
    case Fn::Range: {
      if (!kw.empty()) err(at, "range() takes no keyword arguments");
      int64_t a[3] = {0, 0, 1};
      if (pos.empty() || pos.size() > 3) err(at, "range expected 1 to 3 arguments, got " + std::to_string(pos.size()));
      for (size_t i = 0; i < pos.size(); ++i)
        if (!intlike(pos[i], &a[i])) err(at, std::string("'") + type_name(pos[i]) + "' object cannot be interpreted as an integer");
      int64_t start = pos.size() == 1 ? 0 : a[0], stop = pos.size() == 1 ? a[0] : a[1], step = pos.size() == 3 ? a[2] : 1;
      if (step == 0) err(at, "range() arg 3 must not be zero");
      std::vector<Value> v;
      for (int64_t i = start; step > 0 ? i < stop : i > stop;) {
        if (static_cast<int64_t>(v.size()) >= kMaxRange) err(at, "Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).");
        v.push_back(Value::integer(i));
        if (__builtin_add_overflow(i, step, &i)) break;  // past INT64's end: past stop too
      }
      return make_list(std::move(v));
    }
    case Fn::Namespace: case Fn::Dict: {
      auto d = std::make_shared<DictObj>();
      for (const Value& p : pos) {
        if (p.is_dict()) dict_each(p, [&](const Value& k, const Value& x) { d->set(k, x); });
        else if (p.is_list()) {
          for (size_t i = 0, n = list_size(p); i < n; ++i) {
            Value kv = list_at(p, i);
            if (!kv.is_list() || list_size(kv) != 2 || list_at(kv, 0).k != K::Str) err(at, "dict(): expected (key, value) pairs");
            d->set(list_at(kv, 0), list_at(kv, 1));
          }
        } else err(at, std::string("'") + type_name(p) + "' object is not iterable");
      }
      for (auto& kv : kw) d->set(Value::view(kv.first), kv.second);
      if (fo.fn == Fn::Namespace) {
        for (const auto& kv : d->v)
          if (!kv.first.s.empty() && kv.first.s[0] == '_')
            err(at, "Chat templates cannot store underscore-prefixed attributes on a namespace, but got '" + std::string(kv.first.s) + "'. Please rename the attribute.");
        return make_dict(std::move(d), K::NS);
      }
      return make_dict(std::move(d));
    }
    case Fn::RaiseException: {
      std::string msg = pos.empty() ? std::string() : to_str(pos[0]);
      throw RaisedError{std::move(msg)};
    }
    case Fn::StrftimeNow: {
      if (pos.size() != 1 || pos[0].k != K::Str) err(at, "strftime_now(format) takes one string");
      std::time_t now = std::time(nullptr);
      std::tm tm{};
      localtime_r(&now, &tm);
      char buf[512];
      std::string fmt(pos[0].s);
      size_t n = std::strftime(buf, sizeof buf, fmt.c_str(), &tm);
      return Value::str(std::string(buf, n));
    }
    case Fn::LoopCycle: {
      if (pos.empty()) err(at, "no items for cycling given");
      auto& l = static_cast<LoopObj&>(*fo.self.o);
      return pos[static_cast<size_t>(l.index0) % pos.size()];
    }
    case Fn::LoopChanged: {
      auto& l = static_cast<LoopObj&>(*fo.self.o);
      Value v = make_list(pos);
      if (!l.has_changed || !equal(v, l.last_changed)) {
        l.has_changed = true;
        l.last_changed = v;
        return Value::boolean(true);
      }
      return Value::boolean(false);
    }
  }
  err(at, "not callable");
}

Value Renderer::call_macro(const FuncObj& fo, Args& pos, std::vector<std::pair<std::string_view, Value>>& kw,
                           const Expr& at) {
  const MacroDef& m = *fo.macro;
  if (call_depth_ >= kMaxCallDepth) err(at, "macro calls nested deeper than " + std::to_string(kMaxCallDepth) + " levels (runaway recursion?)");
  if (pos.size() > m.params.size() && !m.uses_varargs)
    err(at, "macro '" + m.name + "' takes not more than " + std::to_string(m.params.size()) + " argument(s)");
  Frame mf;
  mf.parent = fo.scope ? fo.scope : &root_;
  size_t first_default = m.params.size() - m.defaults.size();
  for (size_t i = 0; i < m.params.size(); ++i) {
    const Value* v = i < pos.size() ? &pos[i] : nullptr;
    for (auto& kv : kw)
      if (kv.first == m.params[i]) {
        if (v) err(at, "macro '" + m.name + "' got multiple values for argument '" + m.params[i] + "'");
        v = &kv.second;
      }
    if (v) mf.vars.emplace_back(m.params[i], *v);
    else if (i >= first_default) mf.vars.emplace_back(m.params[i], eval(*m.defaults[i - first_default], mf));
    else mf.vars.emplace_back(m.params[i], Value::undef(m.params[i]));
  }
  auto extra_kw = std::make_shared<DictObj>();
  for (auto& kv : kw) {
    if (std::find(m.params.begin(), m.params.end(), kv.first) != m.params.end()) continue;
    if (m.uses_kwargs) extra_kw->set(Value::view(kv.first), kv.second);
    else err(at, "macro '" + m.name + "' takes no keyword argument '" + std::string(kv.first) + "'");
  }
  if (m.uses_varargs) {
    std::vector<Value> extra;
    for (size_t i = m.params.size(); i < pos.size(); ++i) extra.push_back(pos[i]);
    mf.vars.emplace_back("varargs", make_list(std::move(extra), true));
  }
  if (m.uses_kwargs) mf.vars.emplace_back("kwargs", make_dict(std::move(extra_kw)));
  if (fo.caller.k == K::Func) mf.vars.emplace_back("caller", fo.caller);
  ++call_depth_;
  std::string s;
  try {
    s = capture(m.body, mf);
  } catch (...) {
    --call_depth_;
    throw;
  }
  --call_depth_;
  return Value::str(std::move(s));
}

// Python str / dict / list methods.
Value Renderer::call_method(const Value& self, std::string_view name, Args& pos,
                            std::vector<std::pair<std::string_view, Value>>& kw, const Expr& at) {
  auto arg = [&](size_t i, const char* kname) -> const Value* {
    if (i < pos.size()) return &pos[i];
    for (auto& kv : kw)
      if (kv.first == kname) return &kv.second;
    return nullptr;
  };
  auto need_str = [&](const Value* v, const char* what) -> std::string_view {
    if (!v || v->k != K::Str) err(at, std::string(what) + " must be a str, not " + (v ? type_name(*v) : "nothing"));
    return v->s;
  };
  if (self.k == K::Str) {
    std::string_view s = self.s;
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
      const Value* c = arg(0, "chars");
      std::string_view chars;
      bool has = c && c->k != K::None;
      if (has) chars = need_str(c, "strip arg");
      Value r = Value::view(py_strip(s, has ? &chars : nullptr, name != "rstrip", name != "lstrip"), self.o);
      r.markup = self.markup;
      return r;
    }
    if (name == "split" || name == "rsplit") {
      const Value* sepv = arg(0, "sep");
      const Value* maxv = arg(1, "maxsplit");
      int64_t maxsplit = -1;
      if (maxv && !intlike(*maxv, &maxsplit)) err(at, "maxsplit must be an integer");
      std::vector<Value> parts;
      bool rev = name == "rsplit";
      if (sepv && sepv->k != K::None) {
        std::string_view sep = need_str(sepv, "separator");
        if (sep.empty()) err(at, "empty separator");
        if (!rev) {
          size_t b = 0;
          while (true) {
            size_t p = (maxsplit < 0 || static_cast<int64_t>(parts.size()) < maxsplit) ? s.find(sep, b) : std::string_view::npos;
            if (p == std::string_view::npos) {
              parts.push_back(Value::view(s.substr(b), self.o));
              break;
            }
            parts.push_back(Value::view(s.substr(b, p - b), self.o));
            b = p + sep.size();
          }
        } else {
          size_t e = s.size();
          std::vector<Value> rp;
          while (true) {
            size_t p = (maxsplit < 0 || static_cast<int64_t>(rp.size()) < maxsplit) && e >= sep.size() ? s.rfind(sep, e - sep.size()) : std::string_view::npos;
            if (p == std::string_view::npos) {
              rp.push_back(Value::view(s.substr(0, e), self.o));
              break;
            }
            rp.push_back(Value::view(s.substr(p + sep.size(), e - p - sep.size()), self.o));
            e = p;
          }
          parts.assign(rp.rbegin(), rp.rend());
        }
      } else {
        // whitespace split
        std::vector<std::pair<size_t, size_t>> words;
        size_t i = 0;
        while (i < s.size()) {
          size_t n;
          while (i < s.size() && py_space(decode_at(s, i, &n))) i += n;
          if (i >= s.size()) break;
          size_t b = i;
          while (i < s.size() && !py_space(decode_at(s, i, &n))) i += n;
          words.emplace_back(b, i);
        }
        if (maxsplit >= 0 && static_cast<int64_t>(words.size()) > maxsplit + 0) {
          if (!rev) {
            std::vector<std::pair<size_t, size_t>> w2(words.begin(), words.begin() + maxsplit);
            if (static_cast<size_t>(maxsplit) < words.size()) {
              // the remainder keeps its trailing whitespace, as CPython's split does
              w2.emplace_back(words[static_cast<size_t>(maxsplit)].first, s.size());
            }
            words = w2;
          } else {
            std::vector<std::pair<size_t, size_t>> w2(words.end() - maxsplit, words.end());
            size_t e = words[words.size() - static_cast<size_t>(maxsplit) - 1].second;
            w2.insert(w2.begin(), {size_t(0), e});
            words = w2;
          }
        }
        for (auto& w : words) parts.push_back(Value::view(s.substr(w.first, w.second - w.first), self.o));
      }
      return make_list(std::move(parts));
    }
    if (name == "startswith" || name == "endswith") {
      const Value* p = arg(0, "prefix");
      if (!p) err(at, std::string(name) + "() takes at least 1 argument");
      if (pos.size() > 1) err(at, std::string(name) + "(): start/end arguments are not supported");
      auto test = [&](std::string_view x) {
        if (x.size() > s.size()) return false;
        return name == "startswith" ? s.substr(0, x.size()) == x : s.substr(s.size() - x.size()) == x;
      };
      if (p->is_list()) {
        if (!(p->k == K::List && list_obj(*p).tuple))
          err(at, std::string(name) + " first arg must be str or a tuple of str, not " + type_name(*p));
        for (size_t i = 0, n = list_size(*p); i < n; ++i) {
          Value x = list_at(*p, i);
          if (test(need_str(&x, "tuple item"))) return Value::boolean(true);
        }
        return Value::boolean(false);
      }
      return Value::boolean(test(need_str(p, std::string(name).c_str())));
    }
    if (name == "replace") {
      std::string_view a = need_str(arg(0, "old"), "replace() arg 1"), b = need_str(arg(1, "new"), "replace() arg 2");
      int64_t count = -1;
      if (const Value* c = arg(2, "count"); c && !intlike(*c, &count)) err(at, "replace() count must be an integer");
      std::string o;
      if (a.empty()) {
        // Python inserts `new` between every character (and at both ends)
        int64_t done = 0;
        size_t i = 0;
        while (i <= s.size()) {
          if (count < 0 || done < count) { o.append(b); ++done; }
          if (i == s.size()) break;
          size_t n;
          decode_at(s, i, &n);
          o.append(s.substr(i, n));
          i += n;
        }
        return checked_str(std::move(o), at);
      }
      size_t i = 0;
      int64_t done = 0;
      while (true) {
        size_t p = (count < 0 || done < count) ? s.find(a, i) : std::string_view::npos;
        if (p == std::string_view::npos) break;
        o.append(s.substr(i, p - i)).append(b);
        i = p + a.size();
        ++done;
        if (o.size() > kMaxOutputBytes) err(at, "string larger than 64 MiB");
      }
      o.append(s.substr(i));
      return Value::str(std::move(o));
    }
    if (name == "upper") return Value::str(map_case(s, 1));
    if (name == "lower" || name == "casefold") return Value::str(map_case(s, 0));
    if (name == "title") return Value::str(py_title(s));
    if (name == "capitalize") return Value::str(py_capitalize(s));
    if (name == "find" || name == "rfind" || name == "index" || name == "rindex") {
      std::string_view x = need_str(arg(0, "sub"), "find() arg");
      size_t p = (name == "find" || name == "index") ? s.find(x) : s.rfind(x);
      if (p == std::string_view::npos) {
        if (name == "index" || name == "rindex") err(at, "substring not found");
        return Value::integer(-1);
      }
      return Value::integer(static_cast<int64_t>(cp_count(s.substr(0, p))));
    }
    if (name == "count") {
      std::string_view x = need_str(arg(0, "sub"), "count() arg");
      if (x.empty()) return Value::integer(static_cast<int64_t>(cp_count(s)) + 1);
      int64_t n = 0;
      for (size_t p = s.find(x); p != std::string_view::npos; p = s.find(x, p + x.size())) ++n;
      return Value::integer(n);
    }
    if (name == "join") {
      const Value* it = arg(0, "iterable");
      if (!it) err(at, "join() takes exactly one argument");
      std::vector<Value> items;
      iterate(*it, &items, at);
      std::string o;
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) o.append(s);
        if (items[i].k != K::Str) err(at, "sequence item " + std::to_string(i) + ": expected str instance, " + type_name(items[i]) + " found");
        o.append(items[i].s);
      }
      return checked_str(std::move(o), at);
    }
    if (name == "splitlines") {
      std::vector<Value> parts;
      size_t b = 0;
      for (size_t i = 0; i < s.size(); ++i) {
        if (s[i] == '\n' || s[i] == '\r') {
          parts.push_back(Value::view(s.substr(b, i - b), self.o));
          if (s[i] == '\r' && i + 1 < s.size() && s[i + 1] == '\n') ++i;
          b = i + 1;
        }
      }
      if (b < s.size()) parts.push_back(Value::view(s.substr(b), self.o));
      return make_list(std::move(parts));
    }
    if (name == "partition" || name == "rpartition") {
      std::string_view sep = need_str(arg(0, "sep"), "separator");
      if (sep.empty()) err(at, "empty separator");
      size_t p = name == "partition" ? s.find(sep) : s.rfind(sep);
      if (p == std::string_view::npos)
        return name == "partition" ? make_list({self, Value::view(""), Value::view("")}, true)
                                   : make_list({Value::view(""), Value::view(""), self}, true);
      return make_list({Value::view(s.substr(0, p), self.o), Value::view(s.substr(p, sep.size()), self.o),
                        Value::view(s.substr(p + sep.size()), self.o)}, true);
    }
    if (name == "removeprefix" || name == "removesuffix") {
      std::string_view x = need_str(arg(0, "prefix"), "arg");
      if (name == "removeprefix" && s.substr(0, std::min(x.size(), s.size())) == x) return Value::view(s.substr(x.size()), self.o);
      if (name == "removesuffix" && !x.empty() && s.size() >= x.size() && s.substr(s.size() - x.size()) == x)
        return Value::view(s.substr(0, s.size() - x.size()), self.o);
      return self;
    }
    if (name == "isdigit" || name == "isalpha" || name == "isalnum" || name == "isspace" || name == "isupper" ||
        name == "islower" || name == "isnumeric" || name == "isdecimal") {
      if (s.empty()) return Value::boolean(false);
      bool any_cased = false;
      for (size_t i = 0; i < s.size();) {
        size_t n;
        uint32_t c = decode_at(s, i, &n);
        i += n;
        auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
        bool digit = cat == UTF8PROC_CATEGORY_ND;
        bool alpha = cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LL || cat == UTF8PROC_CATEGORY_LT ||
                     cat == UTF8PROC_CATEGORY_LM || cat == UTF8PROC_CATEGORY_LO;
        bool ok = true;
        if (name == "isdigit" || name == "isnumeric" || name == "isdecimal") ok = digit;
        else if (name == "isalpha") ok = alpha;
        else if (name == "isalnum") ok = alpha || digit;
        else if (name == "isspace") ok = py_space(c);
        else if (name == "isupper") {
          if (cat == UTF8PROC_CATEGORY_LL) return Value::boolean(false);
          if (cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LT) any_cased = true;
        } else if (name == "islower") {
          if (cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LT) return Value::boolean(false);
          if (cat == UTF8PROC_CATEGORY_LL) any_cased = true;
        }
        if (!ok) return Value::boolean(false);
      }
      if (name == "isupper" || name == "islower") return Value::boolean(any_cased);
      return Value::boolean(true);
    }
    if (name == "format") {
      std::string o;
      size_t auto_idx = 0;
      for (size_t i = 0; i < s.size(); ++i) {
        char c = s[i];
        if (c == '{') {
          if (i + 1 < s.size() && s[i + 1] == '{') { o += '{'; ++i; continue; }
          size_t e = s.find('}', i);
          if (e == std::string_view::npos) err(at, "Single '{' encountered in format string");
          std::string_view field = s.substr(i + 1, e - i - 1);
          if (field.find_first_of(":!") != std::string_view::npos) err(at, "format specs in str.format are not supported");
          const Value* v = nullptr;
          if (field.empty()) {
            if (auto_idx >= pos.size()) err(at, "Replacement index out of range for positional args tuple");
            v = &pos[auto_idx++];
          } else if (std::isdigit(static_cast<unsigned char>(field[0]))) {
            size_t k = static_cast<size_t>(std::atoi(std::string(field).c_str()));
            if (k >= pos.size()) err(at, "Replacement index out of range for positional args tuple");
            v = &pos[k];
          } else {
            for (auto& kv : kw)
              if (kv.first == field) v = &kv.second;
            if (!v) err(at, "KeyError: '" + std::string(field) + "'");
          }
          append_str(o, *v);
          i = e;
        } else if (c == '}') {
          if (i + 1 < s.size() && s[i + 1] == '}') ++i;
          o += '}';
        } else {
          o += c;
        }
      }
      return Value::str(std::move(o));
    }
    if (name == "zfill") {
      int64_t w = 0;
      if (!arg(0, "width") || !intlike(*arg(0, "width"), &w)) err(at, "zfill() needs an integer width");
      if (w > 1 << 20) err(at, "width too large");
      int64_t n = static_cast<int64_t>(cp_count(s));
      if (n >= w) return self;
      std::string o;
      size_t sign = (!s.empty() && (s[0] == '+' || s[0] == '-')) ? 1 : 0;
      o.append(s.substr(0, sign));
      o.append(static_cast<size_t>(w - n), '0');
      o.append(s.substr(sign));
      return Value::str(std::move(o));
    }
    if (name == "center" || name == "ljust" || name == "rjust") {
      int64_t w = 0;
      if (!arg(0, "width") || !intlike(*arg(0, "width"), &w)) err(at, std::string(name) + "() needs an integer width");
      if (w > 1 << 20) err(at, "width too large");
      std::string_view fill = " ";
      if (const Value* fv = arg(1, "fillchar")) fill = need_str(fv, "fillchar");
      if (cp_count(fill) != 1) err(at, "The fill character must be exactly one character long");
      int64_t n = static_cast<int64_t>(cp_count(s));
      if (n >= w) return self;
      int64_t pad = w - n, left = name == "rjust" ? pad : name == "ljust" ? 0 : pad / 2 + (pad & w & 1);
      std::string o;
      for (int64_t k = 0; k < left; ++k) o.append(fill);
      o.append(s);
      for (int64_t k = 0; k < pad - left; ++k) o.append(fill);
      return Value::str(std::move(o));
    }
    err(at, "str." + std::string(name) + "() is not supported by ptk's chat-template interpreter");
  }
  if (self.is_dict()) {
    if (name == "get") {
      const Value* k = arg(0, "key");
      if (!k) err(at, "get expected at least 1 argument, got 0");
      const Value* d = arg(1, "default");
      Value v;
      if (k->k == K::Str && dict_get(self, k->s, &v)) return v;
      return d ? *d : Value::none();
    }
    if (name == "items" || name == "keys" || name == "values") {
      std::vector<Value> v;
      dict_each(self, [&](const Value& k, const Value& x) {
        if (name == "items") v.push_back(make_list({k, x}, true));
        else v.push_back(name == "keys" ? k : x);
      });
      return make_list(std::move(v));
    }
    if (name == "copy") {
      auto d = std::make_shared<DictObj>();
      dict_each(self, [&](const Value& k, const Value& x) { d->v.emplace_back(k, x); });
      return make_dict(std::move(d));
    }
    err(at, "dict." + std::string(name) + "() modifies the dict: the sandbox refuses it (use a namespace or dict literals)");
  }
  if (self.is_list()) {
    if (name == "index" || name == "count") {
      const Value* x = arg(0, "value");
      if (!x) err(at, std::string(name) + "() takes exactly one argument");
      int64_t n = 0;
      for (size_t i = 0, m = list_size(self); i < m; ++i) {
        if (equal(list_at(self, i), *x)) {
          if (name == "index") return Value::integer(static_cast<int64_t>(i));
          ++n;
        }
      }
      if (name == "index") err(at, "value is not in list");
      return Value::integer(n);
    }
    if (name == "copy") return make_list([&] {
      std::vector<Value> v;
      for (size_t i = 0, m = list_size(self); i < m; ++i) v.push_back(list_at(self, i));
      return v;
    }());
    err(at, "list." + std::string(name) + "() modifies the list: the sandbox refuses it (build a new list with +)");
  }
  err(at, std::string("'") + type_name(self) + "' object has no method '" + std::string(name) + "'");
}

// Python sort key comparison for sort / dictsort / min / max / unique (case-insensitive strings unless asked).
struct SortKey {
  Value v;
};

Value Renderer::apply_filter(int id, const Value& v, Args& pos, std::vector<std::pair<std::string_view, Value>>& kw,
                             const Expr& at, Frame& f) {
  Binder bind{pos, kw, at, this, nullptr, {}};
  auto args = [&](std::initializer_list<const char*> names) {
    bind.names.assign(names);
    if (pos.size() > names.size()) err(at, "filter '" + at.name + "' got too many arguments");
    for (auto& kv : kw) {
      bool known = false;
      for (const char* n : names)
        if (kv.first == n) known = true;
      if (!known) err(at, "filter '" + at.name + "' got an unexpected keyword argument '" + std::string(kv.first) + "'");
    }
  };
  auto need_defined = [&](const Value& x) {
    if (x.k == K::Undef) undefined_error(at, x);
  };
  auto attr_path = [&](const Value& item, const Value& attr) -> Value {
    // "a.b" paths, and integer keys, as jinja2's make_attrgetter
    if (attr.k != K::Str) return get_item(item, attr, at);
    Value cur = item;
    std::string_view path = attr.s;
    size_t b = 0;
    while (true) {
      size_t dot = path.find('.', b);
      std::string_view part = path.substr(b, dot == std::string_view::npos ? std::string_view::npos : dot - b);
      bool digits = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); });
      cur = digits ? get_item(cur, Value::integer(std::atoll(std::string(part).c_str())), at) : get_item(cur, Value::view(part), at);
      if (dot == std::string_view::npos) break;
      b = dot + 1;
    }
    return cur;
  };
  auto sort_cmp = [&](const Value& a, const Value& b, bool case_sensitive) {
    if (!case_sensitive && a.k == K::Str && b.k == K::Str) {
      std::string x = map_case(a.s, 0), y = map_case(b.s, 0);
      return x < y ? -1 : x > y ? 1 : 0;
    }
    return compare(a, b, at, "<");
  };
  switch (id) {
    case F_tojson: {
      args({"ensure_ascii", "indent", "separators", "sort_keys"});
      JsonOpts o;
      if (const Value* x = bind.get(0)) o.ensure_ascii = truthy(*x);
      if (const Value* x = bind.get(1); x && x->k != K::None) {
        o.has_indent = true;
        int64_t n;
        if (intlike(*x, &n)) o.indent.assign(static_cast<size_t>(std::max<int64_t>(0, std::min<int64_t>(n, 1000))), ' ');
        else if (x->k == K::Str) o.indent = std::string(x->s);
        else err(at, "tojson: indent must be an integer or a string");
        o.item_sep = ",";
      }
      if (const Value* x = bind.get(2); x && x->k != K::None) {
        if (!x->is_list() || list_size(*x) != 2 || list_at(*x, 0).k != K::Str || list_at(*x, 1).k != K::Str)
          err(at, "tojson: separators must be a pair of strings");
        o.item_sep = std::string(list_at(*x, 0).s);
        o.key_sep = std::string(list_at(*x, 1).s);
      }
      if (const Value* x = bind.get(3)) o.sort_keys = truthy(*x);
      std::string s;
      append_json(s, v, o, 0, at);
      return checked_str(std::move(s), at);
    }
    case F_trim: {
      args({"chars"});
      Value sv = str_value(v);
      const Value* c = bind.get(0);
      std::string_view chars;
      bool has = c && c->k != K::None;
      if (has) {
        if (c->k != K::Str) err(at, "trim: chars must be a string");
        chars = c->s;
      }
      Value r = Value::view(py_strip(sv.s, has ? &chars : nullptr, true, true), sv.o);
      r.markup = v.markup;
      return r;
    }
    case F_length: case F_count: args({}); return Value::integer(length(v, at));
    case F_first: case F_last: {
      args({});
      if (v.k == K::Undef) return v;
      std::vector<Value> items;
      if (v.is_list()) {
        size_t n = list_size(v);
        if (n == 0) return Value::undef("No first item, sequence was empty.");
        return list_at(v, id == F_first ? 0 : n - 1);
      }
      iterate(v, &items, at);
      if (items.empty()) return Value::undef("No first item, sequence was empty.");
      return id == F_first ? items.front() : items.back();
    }
    case F_join: {
      args({"d", "attribute"});
      std::string_view sep;
      Value sepv;
      if (const Value* x = bind.get(0)) { sepv = str_value(*x); sep = sepv.s; }
      const Value* attr = bind.get(1);
      std::vector<Value> items;
      iterate(v, &items, at);
      std::string o;
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) o.append(sep);
        append_str(o, attr && attr->k != K::None ? attr_path(items[i], *attr) : items[i]);
      }
      return checked_str(std::move(o), at);
    }
    case F_upper: args({}); return Value::str(map_case(to_str(v), 1));
    case F_lower: args({}); return Value::str(map_case(to_str(v), 0));
    case F_capitalize: args({}); return Value::str(py_capitalize(to_str(v)));
    case F_title: {
      args({});
      // jinja2's do_title: capitalise each word after whitespace, '-', '(', '{', '[', '<'
      std::string s = to_str(v), o;
      bool start = true;
      for (size_t i = 0; i < s.size();) {
        size_t n;
        uint32_t c = decode_at(s, i, &n);
        std::string one(s.substr(i, n));
        i += n;
        bool sepc = py_space(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
        if (sepc) { o += one; start = true; continue; }
        o += map_case(one, start ? 1 : 0);
        start = false;
      }
      return Value::str(std::move(o));
    }
    case F_string: {
      args({});
      Value r = str_value(v);
      r.markup = v.markup;
      return r;
    }
    case F_safe: {
      args({});
      Value r = str_value(v);
      r.markup = true;
      return r;
    }
    case F_e: case F_escape: case F_forceescape: {
      args({});
      if (v.markup) return v;
      Value r = Value::str(html_escape(to_str(v)));
      r.markup = true;
      return r;
    }
    case F_list: {
      args({});
      std::vector<Value> items;
      iterate(v, &items, at);
      return make_list(std::move(items));
    }
    case F_items: {
      args({});
      if (v.k == K::Undef) return make_list({});
      if (!v.is_dict()) err(at, "Can only get item pairs from a mapping.");
      std::vector<Value> items;
      dict_each(v, [&](const Value& k, const Value& x) { items.push_back(make_list({k, x}, true)); });
      return make_list(std::move(items));
    }
    case F_default: case F_d: {
      args({"default_value", "boolean"});
      const Value* dv = bind.get(0);
      const Value* b = bind.get(1);
      bool use = v.k == K::Undef || (b && truthy(*b) && !truthy(v));
      if (use) return dv ? *dv : Value::view("");
      return v;
    }
    case F_selectattr: case F_rejectattr: case F_select: case F_reject: {
      bool by_attr = id == F_selectattr || id == F_rejectattr;
      bool keep_if = id == F_selectattr || id == F_select;
      size_t first = by_attr ? 1 : 0;
      if (by_attr && pos.empty()) err(at, "Missing parameter for attribute name");
      if (!kw.empty()) err(at, "filter '" + at.name + "' takes no keyword arguments");
      int tid = -1;
      if (pos.size() > first) {
        if (pos[first].k != K::Str) err(at, "test name must be a string");
        tid = lookup(kTests, pos[first].s);
        if (tid < 0) err(at, "No test named '" + std::string(pos[first].s) + "'.");
      }
      Args targs(pos.begin() + static_cast<std::ptrdiff_t>(std::min(pos.size(), first + 1)), pos.end());
      std::vector<Value> items, out_items;
      iterate(v, &items, at);
      for (const Value& x : items) {
        Value y = by_attr ? attr_path(x, pos[0]) : x;
        bool ok = tid < 0 ? truthy(y) : apply_test(tid, y, targs, at, f);
        if (ok == keep_if) out_items.push_back(x);
      }
      return make_list(std::move(out_items));
    }
    case F_map: {
      std::vector<Value> items, out_items;
      iterate(v, &items, at);
      const Value* attr = nullptr;
      const Value* dflt = nullptr;
      for (auto& kv : kw) {
        if (kv.first == "attribute") attr = &kv.second;
        else if (kv.first == "default") dflt = &kv.second;
      }
      if (attr) {
        for (const Value& x : items) {
          Value y = attr_path(x, *attr);
          out_items.push_back(y.k == K::Undef && dflt ? *dflt : y);
        }
        return make_list(std::move(out_items));
      }
      if (pos.empty()) err(at, "map requires a filter argument");
      if (pos[0].k != K::Str) err(at, "map: filter name must be a string");
      int fid = lookup(kFilters, pos[0].s);
      if (fid < 0) err(at, "No filter named '" + std::string(pos[0].s) + "'.");
      Args fargs(pos.begin() + 1, pos.end());
      std::vector<std::pair<std::string_view, Value>> fkw = kw;
      Expr fake;
      fake.kind = E::Filter;
      fake.line = at.line;
      fake.col = at.col;
      fake.name = std::string(pos[0].s);
      for (const Value& x : items) {
        Args a2 = fargs;
        auto k2 = fkw;
        out_items.push_back(apply_filter(fid, x, a2, k2, fake, f));
      }
      return make_list(std::move(out_items));
    }
    case F_reverse: {
      args({});
      if (v.k == K::Str) {
        auto off = cp_offsets(v.s);
        std::string o;
        for (size_t i = off.size() - 1; i > 0; --i) o.append(v.s.substr(off[i - 1], off[i] - off[i - 1]));
        return Value::str(std::move(o));
      }
      std::vector<Value> items;
      iterate(v, &items, at);
      std::reverse(items.begin(), items.end());
      return make_list(std::move(items));
    }
    case F_replace: {
      args({"old", "new", "count"});
      Value sv = str_value(v);
      Args p2;
      std::vector<std::pair<std::string_view, Value>> k2;
      for (int i = 0; i < 3; ++i)
        if (const Value* x = bind.get(static_cast<size_t>(i))) {
          if (i < 2) p2.push_back(str_value(*x));
          else if (x->k != K::None) p2.push_back(*x);
        }
      if (p2.size() < 2) err(at, "replace needs old and new");
      return call_method(sv, "replace", p2, k2, at);
    }
    case F_int: {
      args({"default", "base"});
      Value dflt = bind.get(0) ? *bind.get(0) : Value::integer(0);
      need_defined(v);
      if (v.k == K::Int) return v;
      if (v.k == K::Bool) return Value::integer(v.u.b);
      if (v.k == K::Float) {
        if (std::isfinite(v.u.d) && !fits_int64(v.u.d)) err(at, "int: the number does not fit 64 bits");
        return std::isfinite(v.u.d) ? Value::integer(static_cast<int64_t>(v.u.d)) : dflt;
      }
      if (v.k == K::Str) {
        std::string s(py_strip(v.s, nullptr, true, true));
        s.erase(std::remove(s.begin(), s.end(), '_'), s.end());
        int64_t r;
        auto res = std::from_chars(s.data() + (!s.empty() && s[0] == '+' ? 1 : 0), s.data() + s.size(), r);
        if (res.ec == std::errc() && res.ptr == s.data() + s.size()) return Value::integer(r);
        char* end = nullptr;
        double d = std::strtod(s.c_str(), &end);
        if (!s.empty() && end == s.c_str() + s.size() && std::isfinite(d)) {
          if (!fits_int64(d)) err(at, "int: the number does not fit 64 bits");
          return Value::integer(static_cast<int64_t>(d));
        }
      }
      return dflt;
    }
    case F_float: {
      args({"default"});
      Value dflt = bind.get(0) ? *bind.get(0) : Value::flt(0.0);
      need_defined(v);
      double d;
      if (num(v, &d)) return Value::flt(d);
      if (v.k == K::Str) {
        std::string s(py_strip(v.s, nullptr, true, true));
        char* end = nullptr;
        d = std::strtod(s.c_str(), &end);
        if (!s.empty() && end == s.c_str() + s.size()) return Value::flt(d);
      }
      return dflt;
    }
    case F_format: {
      // jinja2's do_format: str(value) % (kwargs or args)
      if (!kw.empty()) err(at, "format: keyword arguments (%(name)s) are not supported");
      Value sv = str_value(v);
      return percent_format(sv, make_list(pos, true), at);
    }
    case F_abs: {
      args({});
      if (v.k == K::Int) return Value::integer(v.u.i < 0 ? -v.u.i : v.u.i);
      if (v.k == K::Bool) return Value::integer(v.u.b);
      if (v.k == K::Float) return Value::flt(std::fabs(v.u.d));
      need_defined(v);
      err(at, std::string("bad operand type for abs(): '") + type_name(v) + "'");
    }
    case F_round: {
      args({"precision", "method"});
      int64_t prec = 0;
      if (const Value* x = bind.get(0)) intlike(*x, &prec);
      std::string method = "common";
      if (const Value* x = bind.get(1)) method = to_str(*x);
      double d;
      need_defined(v);
      if (!num(v, &d)) err(at, "round: a number is required");
      double m = std::pow(10.0, static_cast<double>(prec));
      double r;
      if (method == "common") {
        // jinja2's "common" is Python's round(value, precision): an int stays an int; a float is
        // rounded correctly from its exact binary value, ties to even (round(2.675, 2) == 2.67).
        if (v.k == K::Int || v.k == K::Bool) return Value::integer(v.k == K::Int ? v.u.i : v.u.b);
        if (!std::isfinite(d) || prec > 300 || prec < -300) return Value::flt(d);
        if (prec >= 0) {
          char buf[400];
          auto res = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::fixed, static_cast<int>(prec));
          r = std::strtod(std::string(buf, res.ptr).c_str(), nullptr);
        } else {
          r = std::nearbyint(d * m) / m;
        }
        if (r == 0) r = std::copysign(0.0, d);
      } else if (method == "ceil") r = std::ceil(d * m) / m;
      else if (method == "floor") r = std::floor(d * m) / m;
      else err(at, "method must be common, ceil or floor");
      return Value::flt(r);
    }
    case F_dictsort: {
      args({"case_sensitive", "by", "reverse"});
      bool cs = bind.get(0) && truthy(*bind.get(0));
      bool by_value = bind.get(1) && bind.get(1)->k == K::Str && bind.get(1)->s == "value";
      bool rev = bind.get(2) && truthy(*bind.get(2));
      need_defined(v);
      if (!v.is_dict()) err(at, "dictsort: a mapping is required");
      std::vector<std::pair<Value, Value>> items;
      dict_each(v, [&](const Value& k, const Value& x) { items.emplace_back(k, x); });
      std::stable_sort(items.begin(), items.end(), [&](const auto& a, const auto& b) {
        int c = by_value ? sort_cmp(a.second, b.second, cs) : sort_cmp(a.first, b.first, cs);
        return rev ? c > 0 : c < 0;
      });
      std::vector<Value> o;
      for (auto& kv : items) o.push_back(make_list({kv.first, kv.second}, true));
      return make_list(std::move(o));
    }
    case F_sort: {
      args({"reverse", "case_sensitive", "attribute"});
      bool rev = bind.get(0) && truthy(*bind.get(0));
      bool cs = bind.get(1) && truthy(*bind.get(1));
      const Value* attr = bind.get(2);
      std::vector<Value> items;
      iterate(v, &items, at);
      std::stable_sort(items.begin(), items.end(), [&](const Value& a, const Value& b) {
        Value x = attr && attr->k != K::None ? attr_path(a, *attr) : a;
        Value y = attr && attr->k != K::None ? attr_path(b, *attr) : b;
        int c = sort_cmp(x, y, cs);
        return rev ? c > 0 : c < 0;
      });
      return make_list(std::move(items));
    }
    case F_unique: {
      args({"case_sensitive", "attribute"});
      bool cs = bind.get(0) && truthy(*bind.get(0));
      const Value* attr = bind.get(1);
      std::vector<Value> items, o, seen;
      iterate(v, &items, at);
      for (const Value& x : items) {
        Value key = attr && attr->k != K::None ? attr_path(x, *attr) : x;
        if (!cs && key.k == K::Str) key = Value::str(map_case(key.s, 0));
        bool dup = false;
        for (const Value& s : seen)
          if (equal(s, key)) dup = true;
        if (!dup) {
          seen.push_back(key);
          o.push_back(x);
        }
      }
      return make_list(std::move(o));
    }
    case F_min: case F_max: {
      args({"case_sensitive", "attribute"});
      bool cs = bind.get(0) && truthy(*bind.get(0));
      const Value* attr = bind.get(1);
      std::vector<Value> items;
      iterate(v, &items, at);
      if (items.empty()) return Value::undef("No aggregated item, sequence was empty.");
      size_t best = 0;
      for (size_t i = 1; i < items.size(); ++i) {
        Value x = attr && attr->k != K::None ? attr_path(items[i], *attr) : items[i];
        Value y = attr && attr->k != K::None ? attr_path(items[best], *attr) : items[best];
        int c = sort_cmp(x, y, cs);
        if (id == F_min ? c < 0 : c > 0) best = i;
      }
      return items[best];
    }
    case F_sum: {
      args({"attribute", "start"});
      const Value* attr = bind.get(0);
      Value acc = bind.get(1) ? *bind.get(1) : Value::integer(0);
      std::vector<Value> items;
      iterate(v, &items, at);
      for (const Value& x : items) acc = arith(Op::Add, acc, attr && attr->k != K::None ? attr_path(x, *attr) : x, at);
      return acc;
    }
    case F_indent: {
      args({"width", "first", "blank"});
      std::string ind = "    ";
      if (const Value* w = bind.get(0)) {
        int64_t n;
        if (intlike(*w, &n)) ind.assign(static_cast<size_t>(std::max<int64_t>(0, std::min<int64_t>(n, 1000))), ' ');
        else ind = to_str(*w);
      }
      bool first = bind.get(1) && truthy(*bind.get(1));
      bool blank = bind.get(2) && truthy(*bind.get(2));
      std::string s = to_str(v);
      std::string o;
      // jinja2: s += "\n" then splitlines; lines after the first get the indent unless blank
      std::vector<std::string_view> lines;
      std::string t = s + "\n";
      size_t b = 0;
      for (size_t i = 0; i < t.size(); ++i) {
        if (t[i] == '\n' || t[i] == '\r') {
          lines.push_back(std::string_view(t).substr(b, i - b));
          if (t[i] == '\r' && i + 1 < t.size() && t[i + 1] == '\n') ++i;
          b = i + 1;
        }
      }
      for (size_t i = 0; i < lines.size(); ++i) {
        if (i) o += '\n';
        bool indent_it = i == 0 ? first : (blank || !py_strip(lines[i], nullptr, true, true).empty());
        if (i == 0 && first && !blank && lines[i].empty()) indent_it = first;
        if (indent_it) o += ind;
        o.append(lines[i]);
        if (o.size() > kMaxOutputBytes) err(at, "string larger than 64 MiB");  // lines x indent
      }
      return Value::str(std::move(o));
    }
    case F_batch: {
      args({"linecount", "fill_with"});
      int64_t n = 0;
      if (!bind.get(0) || !intlike(*bind.get(0), &n) || n <= 0) err(at, "batch: linecount must be a positive integer");
      const Value* fill = bind.get(1);
      std::vector<Value> items, o, cur;
      iterate(v, &items, at);
      for (const Value& x : items) {
        cur.push_back(x);
        if (static_cast<int64_t>(cur.size()) == n) {
          o.push_back(make_list(std::move(cur)));
          cur.clear();
        }
      }
      if (!cur.empty()) {
        if (fill && fill->k != K::None)
          while (static_cast<int64_t>(cur.size()) < n) cur.push_back(*fill);
        o.push_back(make_list(std::move(cur)));
      }
      return make_list(std::move(o));
    }
    case F_wordcount: {
      args({});
      Args p2;
      std::vector<std::pair<std::string_view, Value>> k2;
      Value words = call_method(str_value(v), "split", p2, k2, at);
      return Value::integer(static_cast<int64_t>(list_size(words)));
    }
    case F_center: {
      args({"width"});
      Args p2{bind.get(0) ? *bind.get(0) : Value::integer(80)};
      std::vector<std::pair<std::string_view, Value>> k2;
      return call_method(str_value(v), "center", p2, k2, at);
    }
    case F_attr: {
      args({"name"});
      if (!bind.get(0) || bind.get(0)->k != K::Str) err(at, "attr: name must be a string");
      need_defined(v);
      return get_attr(v, bind.get(0)->s, at);
    }
    default: err(at, "filter '" + at.name + "' is not supported by ptk's chat-template interpreter");
  }
}

bool Renderer::apply_test(int id, const Value& v, Args& pos, const Expr& at, Frame& f) {
  (void)f;
  auto arg0 = [&]() -> const Value& {
    if (pos.empty()) err(at, "test '" + at.name + "' needs an argument");
    return pos[0];
  };
  switch (id) {
    case T_defined: return v.k != K::Undef;
    case T_undefined: return v.k == K::Undef;
    case T_none: return v.k == K::None;
    case T_string: return v.k == K::Str;
    case T_number: return v.k == K::Int || v.k == K::Float || v.k == K::Bool;
    case T_integer: return v.k == K::Int;
    case T_float: return v.k == K::Float;
    case T_boolean: return v.k == K::Bool;
    case T_mapping: return v.k == K::Dict || v.k == K::JObj;
    case T_iterable: return v.k == K::Undef || v.k == K::Str || v.is_list() || v.is_dict();
    case T_sequence: return v.k == K::Undef || v.k == K::Str || v.is_list() || v.is_dict();
    case T_true: return v.k == K::Bool && v.u.b;
    case T_false: return v.k == K::Bool && !v.u.b;
    case T_odd: case T_even: {
      int64_t i;
      if (v.k == K::Undef) undefined_error(at, v);
      if (!intlike(v, &i)) {
        if (v.k == K::Float) return std::fmod(v.u.d, 2.0) == (id == T_odd ? 1.0 : 0.0);
        err(at, std::string("unsupported operand type(s) for %: '") + type_name(v) + "' and 'int'");
      }
      return (((i % 2) + 2) % 2 == 1) == (id == T_odd);
    }
    case T_divisibleby: {
      Value m = arith(Op::Mod, v, arg0(), at);
      return equal(m, Value::integer(0));
    }
    case T_eq: case T_equalto: case T_eq2: return equal(v, arg0());
    case T_ne: case T_ne2: return !equal(v, arg0());
    case T_lt: case T_lt2: case T_lessthan: return compare(v, arg0(), at, "<") < 0;
    case T_le: case T_le2: return compare(v, arg0(), at, "<=") <= 0;
    case T_gt: case T_gt2: case T_greaterthan: return compare(v, arg0(), at, ">") > 0;
    case T_ge: case T_ge2: return compare(v, arg0(), at, ">=") >= 0;
    case T_in: return contains(arg0(), v, at);
    case T_callable: return v.k == K::Func;
    case T_sameas: {
      const Value& o = arg0();
      if (v.k != o.k) return false;
      switch (v.k) {
        case K::None: case K::Undef: return true;
        case K::Bool: return v.u.b == o.u.b;
        case K::Int: return v.u.i == o.u.i;
        case K::JArr: case K::JObj: return v.u.j == o.u.j;
        case K::Str: return v.s.data() == o.s.data() && v.s.size() == o.s.size();
        default: return v.o == o.o;
      }
    }
    case T_lower: return v.k == K::Str && map_case(v.s, 0) == v.s;
    case T_upper: return v.k == K::Str && map_case(v.s, 1) == v.s;
    case T_filter: return v.k == K::Str && lookup(kFilters, v.s) >= 0;
    case T_test: return v.k == K::Str && lookup(kTests, v.s) >= 0;
    case T_escaped: return v.markup;
  }
  err(at, "test '" + at.name + "' is not supported");
}

void Renderer::assign(const Target& tg, const Value& v, Frame& f, const Stmt& at) {
  if (!tg.tuple) {
    f.set(tg.names[0], v);
    return;
  }
  std::vector<Value> items;
  Expr fake;
  fake.line = at.line;
  fake.col = at.col;
  iterate(v, &items, fake);
  if (items.size() != tg.names.size())
    fail(at.line, at.col, (items.size() > tg.names.size() ? "too many values to unpack (expected " : "not enough values to unpack (expected ") +
                              std::to_string(tg.names.size()) + ", got " + std::to_string(items.size()) + ")");
  for (size_t i = 0; i < items.size(); ++i) f.set(tg.names[i], items[i]);
}

Flow Renderer::exec_for(const Stmt& s, Frame& f) {
  Value seq = eval(*s.expr, f);
  std::vector<Value> raw;
  iterate(seq, &raw, *s.expr);
  std::vector<Value> items;
  if (s.cond) {
    for (const Value& x : raw) {
      Frame tf;
      tf.parent = &f;
      assign(s.target, x, tf, s);
      if (truthy(eval(*s.cond, tf))) items.push_back(x);
      count_iteration(s.line);
    }
  } else {
    items = std::move(raw);
  }
  if (items.empty()) {
    if (!s.else_body.empty()) return exec(s.else_body, f);
    return Flow::Normal;
  }
  auto loop = std::make_shared<LoopObj>();
  loop->length = static_cast<int64_t>(items.size());
  loop->items = std::move(items);
  const std::vector<Value>& its = loop->items;
  Value lv;
  lv.k = K::Loop;
  lv.o = loop;
  for (size_t i = 0; i < its.size(); ++i) {
    count_iteration(s.line);
    loop->index0 = static_cast<int64_t>(i);
    Frame it;
    it.parent = &f;
    it.vars.reserve(4);
    it.vars.emplace_back("loop", lv);
    assign(s.target, its[i], it, s);
    Flow fl = exec(s.body, it);
    if (fl == Flow::Break) break;
  }
  return Flow::Normal;
}

Flow Renderer::exec(const Body& body, Frame& f) {
  EvalDepth guard(eval_depth_, body.empty() ? cur_line_ : body.front()->line, 0);
  for (const StmtP& sp : body) {
    const Stmt& s = *sp;
    cur_line_ = s.line;
    switch (s.kind) {
      case S::Text: out(s.text); break;
      case S::Output: {
        Value v = eval(*s.expr, f);
        if (v.k == K::Str) out(v.s);
        else if (v.k != K::Undef) {
          std::string tmp;
          append_str(tmp, v);
          out(tmp);
        }
        break;
      }
      case S::If: {
        for (const auto& br : s.branches) {
          if (!br.first || truthy(eval(*br.first, f))) {
            Flow fl = exec(br.second, f);
            if (fl != Flow::Normal) return fl;
            break;
          }
        }
        break;
      }
      case S::For: {
        Flow fl = exec_for(s, f);
        if (fl != Flow::Normal) return fl;
        break;
      }
      case S::Set: assign(s.target, eval(*s.expr, f), f, s); break;
      case S::SetAttr: {
        const Value* ns = f.find(s.target.names[0]);
        Value nsv = ns ? *ns : Value();
        if (!ns) {
          Expr fake;
          fake.name = s.target.names[0];
          nsv = lookup_name(fake, f);
        }
        if (nsv.k != K::NS) fail(s.line, s.col, "Can only set attributes on namespace objects ('" + s.target.names[0] + "' is " + type_name(nsv) + ")");
        if (!s.attr.empty() && s.attr[0] == '_')
          fail(s.line, s.col, "Chat templates cannot store underscore-prefixed attributes on a namespace, but got '" + s.attr + "'. Please rename the attribute.");
        dict_obj(nsv).set(Value::view(s.attr), eval(*s.expr, f));
        break;
      }
      case S::SetBlock: {
        std::string body_text = capture(s.body, f);
        Value v = Value::str(std::move(body_text));
        if (s.expr) {
          Frame tf;
          tf.parent = &f;
          tf.vars.emplace_back("\x01filter_input", v);
          v = eval(*s.expr, tf);
        }
        assign(s.target, v, f, s);
        break;
      }
      case S::Macro: {
        auto fo = std::make_shared<FuncObj>();
        fo->fn = Fn::Macro;
        fo->macro = s.macro.get();
        fo->name = s.macro->name;
        if (&f != &root_) {
          fo->captured = snapshot(f);
          fo->scope = fo->captured.get();
        }
        Value v;
        v.k = K::Func;
        v.o = std::move(fo);
        f.set(s.macro->name, v);
        break;
      }
      case S::CallBlock: {
        auto caller = std::make_shared<FuncObj>();
        caller->fn = Fn::Macro;
        caller->macro = s.macro.get();
        if (&f != &root_) {
          caller->captured = snapshot(f);
          caller->scope = caller->captured.get();
        }
        Value cv;
        cv.k = K::Func;
        cv.o = caller;
        const Expr& ce = *s.expr;
        Value fn = eval(*ce.a[0], f);
        if (fn.k != K::Func || func_obj(fn).fn != Fn::Macro) fail(s.line, s.col, "{% call %} needs a macro");
        auto with_caller = std::make_shared<FuncObj>(func_obj(fn));
        with_caller->caller = cv;
        Args pos;
        std::vector<std::pair<std::string_view, Value>> kw;
        eval_args(ce, 1, f, &pos, &kw);
        Value r = call_macro(*with_caller, pos, kw, ce);
        out(r.s);
        break;
      }
      case S::FilterBlock: {
        Value v = Value::str(capture(s.body, f));
        Frame tf;
        tf.parent = &f;
        tf.vars.emplace_back("\x01filter_input", v);
        Value r = eval(*s.expr, tf);
        out(to_str(r));
        break;
      }
      case S::Generation: {
        std::string text = capture(s.body, f);
        size_t start = top_.size();
        if (!text.empty()) gen_.emplace_back(start, start + text.size());
        out(text);
        break;
      }
      case S::Break: return Flow::Break;
      case S::Continue: return Flow::Continue;
      case S::With: {
        Frame wf;
        wf.parent = &f;
        for (const auto& a : s.assigns) assign(a.first, eval(*a.second, f), wf, s);
        Flow fl = exec(s.body, wf);
        if (fl != Flow::Normal) return fl;
        break;
      }
    }
  }
  return Flow::Normal;
}

Rendering Renderer::run() {
  exec(t_.body, root_);
  Rendering r;
  r.text = std::move(top_);
  // A {% generation %} block inside a macro or {% set %} capture is placed, as transformers places it,
  // where the top-level output stood when the block ran; a capture that is never printed would leave
  // such a span past the end of the text (transformers keeps it): cut it to the text, drop it if empty.
  for (auto& g : gen_) {
    g.second = std::min(g.second, r.text.size());
    if (g.first < g.second) r.generation.push_back(g);
  }
  return r;
}

}  // namespace

Template::Template(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Template::Template(Template&&) noexcept = default;
Template& Template::operator=(Template&&) noexcept = default;
Template::~Template() = default;

Template Template::parse(std::string_view source, const std::string& origin) {
  auto impl = std::make_unique<Impl>();
  impl->source = std::string(source);
  impl->origin = origin;
  // jinja2 normalises newlines (\r\n and \r to \n) and drops one trailing newline.
  std::string norm;
  norm.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] == '\r') {
      norm += '\n';
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    } else {
      norm += source[i];
    }
  }
  if (!norm.empty() && norm.back() == '\n') norm.pop_back();
  try {
    Lexer lx(std::move(norm));
    Parser p(lx.run());
    impl->body = p.parse_template(&impl->has_generation);
  } catch (const TemplateError& e) {
    throw Error(origin + ":" + std::to_string(e.line) + ":" + std::to_string(e.col) + ": " + e.msg);
  }
  return Template(std::move(impl));
}

Rendering Template::render(const rapidjson::Value& context) const {
  if (!context.IsObject()) throw Error(impl_->origin + ": the rendering context must be a JSON object");
  Renderer r(*impl_, context);
  try {
    return r.run();
  } catch (const TemplateError& e) {
    std::string where = impl_->origin + ":" + std::to_string(e.line);
    if (e.col > 0) where += ":" + std::to_string(e.col);
    throw Error(where + ": " + e.msg);
  } catch (const RaisedError& e) {
    throw Error(e.msg);
  }
}

Rendering Template::render(std::string_view context_json) const {
  rapidjson::Document doc = json::parse(context_json, impl_->origin + " context");
  return render(static_cast<const rapidjson::Value&>(doc));
}

bool Template::has_generation_blocks() const { return impl_->has_generation; }
const std::string& Template::source() const { return impl_->source; }

}  // namespace ptk::jinja
