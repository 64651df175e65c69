// RapidJSON helpers: parsing with file:line:column errors and ptk's one nesting limit, recipes'
// relaxed syntax (comments, trailing commas), and compact/pretty serialisation. Not a schema layer
// (see core/config).
//
// Every JSON text ptk reads goes through parse_into (or parse/parse_file, built on it): RapidJSON's
// Parse recurses once per [ or { level, so 200k levels of `[[[[` overflowed the stack (exit 139).
// parse_into stops the parser at the first bracket past kMaxDepth, with no pass over the text of
// its own (the cost is a counter per bracket; measured +0.4% instructions on Qwen's tokenizer.json).
// With rapidjson::kParseFullPrecisionFlag it also reads every number exactly (see exact_number).
#pragma once
#include <rapidjson/document.h>
#include <rapidjson/memorystream.h>
#include <rapidjson/encodedstream.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

namespace ptk::json {

// The deepest [ / { nesting ptk accepts in any JSON it reads (the top-level value is level 1).
// Real files are shallow: HF tokenizer.json and config.json nest 5 to 6 levels, chat records with
// tool schemas a few dozen at most. Parsing 512 levels takes under 48 KiB of stack in a Release
// build (measured on a thread with a small stack), so any thread can afford it.
inline constexpr int kMaxDepth = 512;

// Relaxed: comments (// and /* */), trailing commas, NaN/Infinity. Strict: plain JSON.
enum class Syntax { kStrict, kRelaxed };

// Why parse_into failed (or that it did not).
struct ParseStatus {
  rapidjson::ParseErrorCode code = rapidjson::kParseErrorNone;
  bool too_deep = false;  // nested deeper than kMaxDepth (code is then kParseErrorTermination)
  size_t offset = 0;      // byte offset of the error: too deep, the [ or { that opens level 513
  bool ok() const { return code == rapidjson::kParseErrorNone; }
  // "nested deeper than 512 levels" or RapidJSON's English text, e.g. "Invalid value."
  std::string message() const;
};

namespace detail {
// A JSON number token's value: an integer literal that fits 64 bits as that integer, anything else
// (fractions, exponents, larger integers, NaN/Infinity) as the correctly rounded double.
struct Number {
  enum Kind { kInt64, kUint64, kDouble } kind;
  int64_t i = 0;
  uint64_t u = 0;
  double d = 0;
};
// `s` is a token RapidJSON has validated as a number (kParseNumbersAsStringsFlag hands it over).
Number read_number(const char* s, size_t n);

// Full precision done right: RapidJSON's default number reader lands 1 ulp off for about a quarter
// of the doubles its own Writer prints (0.0017006802721088435 came back as ...437), so a value saved
// in a checkpoint (GRPO's prompt variances in the data cursor) would not resume bit for bit; and the
// kParseFullPrecisionFlag path of the RapidJSON 1.1 ptk builds against is wrong on long integers
// ("184467440737095516155" read as 1.74e41, calling clz(0) on the way: undefined behaviour, found by
// replaying the fuzz corpus under UBSan). So parse_into asks RapidJSON for the number's text and
// converts it here (std::from_chars), with RapidJSON's own syntax checks and error offsets.
template <typename Handler>
bool exact_number(Handler& h, const char* s, size_t n) {
  Number v = read_number(s, n);
  switch (v.kind) {
    case Number::kInt64: return h.Int64(v.i);
    case Number::kUint64: return h.Uint64(v.u);
    default: return h.Double(v.d);
  }
}

// Forwards RapidJSON's SAX events to a document and counts [ / { levels. The reader calls
// StartObject/StartArray at the bracket, before it parses (the recursive reader: recurses into)
// the contents, so refusing level kMaxDepth + 1 there stops it (kParseErrorTermination). With
// kExactNumbers, number tokens (RawNumber) become their exact values.
template <typename Handler, bool kExactNumbers>
struct DepthLimited {
  using Ch = typename Handler::Ch;
  Handler& h;
  int depth = 0;
  bool too_deep = false;
  bool Null() { return h.Null(); }
  bool Bool(bool b) { return h.Bool(b); }
  bool Int(int i) { return h.Int(i); }
  bool Uint(unsigned u) { return h.Uint(u); }
  bool Int64(int64_t i) { return h.Int64(i); }
  bool Uint64(uint64_t u) { return h.Uint64(u); }
  bool Double(double d) { return h.Double(d); }
  bool RawNumber(const Ch* s, rapidjson::SizeType n, bool copy) {
    if constexpr (kExactNumbers) return exact_number(h, s, n);
    else return h.RawNumber(s, n, copy);
  }
  bool String(const Ch* s, rapidjson::SizeType n, bool copy) { return h.String(s, n, copy); }
  bool Key(const Ch* s, rapidjson::SizeType n, bool copy) { return h.Key(s, n, copy); }
  bool StartObject() { return enter() && h.StartObject(); }
  bool EndObject(rapidjson::SizeType n) { return --depth, h.EndObject(n); }
  bool StartArray() { return enter() && h.StartArray(); }
  bool EndArray(rapidjson::SizeType n) { return --depth, h.EndArray(n); }
  bool enter() {
    if (++depth <= kMaxDepth) return true;
    too_deep = true;
    return false;
  }
};
}  // namespace detail

// Parses UTF-8 `text` into `doc` (any GenericDocument) with RapidJSON's own recursive parser and
// `kParseFlags`, refusing nesting deeper than kMaxDepth. Errors come in text order, as RapidJSON
// reports them: a syntax error before the deep part is reported as such. On failure `doc` keeps
// its previous value; doc.HasParseError() is not set (use the status). `stack_allocator` is the
// parser's scratch allocator (nullptr: its own), for callers that reuse one across lines.
// kParseFullPrecisionFlag: every number is read exactly (detail::exact_number), not by RapidJSON.
template <unsigned kParseFlags = rapidjson::kParseDefaultFlags, typename Encoding, typename Allocator,
          typename StackAllocator>
ParseStatus parse_into(rapidjson::GenericDocument<Encoding, Allocator, StackAllocator>& doc, std::string_view text,
                       StackAllocator* stack_allocator = nullptr) {
  static_assert(!(kParseFlags & rapidjson::kParseInsituFlag), "parse_into reads a const text");
  constexpr bool kExact = (kParseFlags & rapidjson::kParseFullPrecisionFlag) != 0;
  constexpr unsigned kFlags =
      kExact ? (kParseFlags & ~rapidjson::kParseFullPrecisionFlag) | rapidjson::kParseNumbersAsStringsFlag : kParseFlags;
  ParseStatus st;
  auto generate = [&](auto& handler) {
    detail::DepthLimited<std::remove_reference_t<decltype(handler)>, kExact> limited{handler};
    rapidjson::GenericReader<rapidjson::UTF8<>, Encoding, StackAllocator> reader(stack_allocator);
    rapidjson::MemoryStream ms(text.data(), text.size());
    rapidjson::EncodedInputStream<rapidjson::UTF8<>, rapidjson::MemoryStream> is(ms);
    rapidjson::ParseResult r = reader.template Parse<kFlags>(is, limited);
    st.code = r.Code();
    st.offset = r.Offset();
    if (limited.too_deep) {
      st.too_deep = true;
      // The recursive reader takes the bracket before StartArray/StartObject; the iterative one after.
      if (!(kFlags & rapidjson::kParseIterativeFlag)) st.offset -= 1;
    }
    return !r.IsError();
  };
  doc.Populate(generate);
  return st;
}

// Parses `text`; on failure throws ptk::Error "<origin>:<line>:<col>: invalid JSON: <reason>", e.g.
// "config.json:1:513: invalid JSON: nested deeper than 512 levels".
rapidjson::Document parse(std::string_view text, const std::string& origin, Syntax syntax = Syntax::kStrict);
// Reads (a regular file only, see read_file) and parses a whole file.
rapidjson::Document parse_file(const std::string& path, Syntax syntax = Syntax::kStrict);

std::string to_string(const rapidjson::Value& v, bool pretty = false);

// 1-based line and column of a byte offset in `text`.
void line_col(std::string_view text, size_t offset, size_t* line, size_t* col);

// "object", "array", "string", "number", "bool", "null".
const char* type_name(const rapidjson::Value& v);

}  // namespace ptk::json
