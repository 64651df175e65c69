// JSONL record parsing, glob expansion and the streaming line reader (see records.h).
// Not tokenization: prepare.cpp turns records into ids and masks.
#include "datasets/records.h"

#include <glob.h>
#include <rapidjson/error/en.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <new>

#include "core/tokenizer/messages_json.h"
#include "core/util/error.h"
#include "core/util/json.h"

namespace ptk::data {

Format parse_format(const std::string& name) {
  if (name == "sft") return Format::kSft;
  if (name == "preference") return Format::kPreference;
  if (name == "rl") return Format::kRl;
  throw Error("unknown data format `" + name + "`; choose sft | preference | rl");
}

const char* format_name(Format f) {
  switch (f) {
    case Format::kSft: return "sft";
    case Format::kPreference: return "preference";
    case Format::kRl: return "rl";
  }
  return "?";
}

namespace {

// Byte offset of the first ill-formed UTF-8 sequence, or npos.
size_t first_invalid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t n = s.size(), i = 0;
  while (i < n) {
    // ASCII runs eight bytes at a time.
    while (i + 8 <= n) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= n) break;
    unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;  // no surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return i;
    }
    if (i + len > n) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k)
      if (p[i + k] < 0x80 || p[i + k] > 0xBF) return i;
    i += len;
  }
  return std::string_view::npos;
}

using Value = rapidjson::Value;

std::string quoted(const char* field) { return std::string("\"") + field + "\""; }

// A message list; `name` is how errors call it ("messages", "prompt").
bool parse_message_list(const Value& v, const std::string& name, std::vector<tokenizer::Message>* out,
                        std::string* reason) {
  if (!v.IsArray()) {
    *reason = quoted(name.c_str()) + " must be a list of messages, got " + json::type_name(v);
    return false;
  }
  if (v.Empty()) {
    *reason = quoted(name.c_str()) + " is empty";
    return false;
  }
  out->clear();
  out->resize(v.Size());
  for (rapidjson::SizeType i = 0; i < v.Size(); ++i) {
    if (!tokenizer::read_message(v[i], &(*out)[i], reason)) {
      *reason = name + "[" + std::to_string(i) + "]" + *reason;
      return false;
    }
  }
  return true;
}

// A required field that is a string or a message list.
bool parse_text_or_messages(const Value& obj, const char* field, TextOrMessages* out, std::string* reason) {
  auto it = obj.FindMember(field);
  if (it == obj.MemberEnd()) {
    *reason = "missing field " + quoted(field);
    return false;
  }
  const Value& v = it->value;
  if (v.IsString()) {
    out->is_messages = false;
    out->text.assign(v.GetString(), v.GetStringLength());
    return true;
  }
  if (v.IsArray()) {
    out->is_messages = true;
    return parse_message_list(v, field, &out->messages, reason);
  }
  *reason = "field " + quoted(field) + " must be a string or a list of messages, got " + json::type_name(v);
  return false;
}

bool is_empty(const TextOrMessages& t) {
  if (!t.is_messages) return t.text.empty();
  return false;  // a message list was already refused when empty
}

bool has_assistant(const std::vector<tokenizer::Message>& m) {
  return std::any_of(m.begin(), m.end(), [](const tokenizer::Message& x) { return x.role == "assistant"; });
}

// A chat record's "tools" and "chat_template_kwargs" (TRL passes both to apply_chat_template);
// plain-text records ignore them, as TRL does.
bool read_extras(const Value& d, tokenizer::ChatExtras* out, std::string* reason) {
  return tokenizer::read_chat_extras(d, out, reason);
}

bool parse_sft(const Value& d, SftRecord* out, std::string* reason) {
  if (d.HasMember("messages")) {
    out->kind = SftRecord::Kind::kMessages;
    if (!parse_message_list(d["messages"], "messages", &out->messages, reason)) return false;
    if (!read_extras(d, &out->chat, reason)) return false;
    if (!has_assistant(out->messages)) {
      *reason = "no assistant message in \"messages\" (nothing to train on)";
      return false;
    }
    return true;
  }
  if (d.HasMember("prompt") || d.HasMember("completion")) {
    out->kind = SftRecord::Kind::kPromptCompletion;
    if (!parse_text_or_messages(d, "prompt", &out->prompt, reason)) return false;
    if (!parse_text_or_messages(d, "completion", &out->completion, reason)) return false;
    if (out->prompt.is_messages != out->completion.is_messages) {
      *reason = "\"prompt\" and \"completion\" must both be strings or both be message lists";
      return false;
    }
    if (out->prompt.is_messages && !read_extras(d, &out->chat, reason)) return false;
    if (is_empty(out->completion)) {
      *reason = "empty \"completion\"";
      return false;
    }
    if (out->completion.is_messages && !has_assistant(out->completion.messages)) {
      *reason = "no assistant message in \"completion\" (nothing to train on)";
      return false;
    }
    return true;
  }
  if (d.HasMember("text")) {
    out->kind = SftRecord::Kind::kText;
    const Value& t = d["text"];
    if (!t.IsString()) {
      *reason = std::string("field \"text\" must be a string, got ") + json::type_name(t);
      return false;
    }
    out->text.assign(t.GetString(), t.GetStringLength());
    if (out->text.empty()) {
      *reason = "empty \"text\"";
      return false;
    }
    return true;
  }
  *reason = "no \"messages\", \"prompt\"/\"completion\" or \"text\" field (an sft record needs one of them)";
  return false;
}

bool parse_preference(const Value& d, PreferenceRecord* out, std::string* reason) {
  if (!parse_text_or_messages(d, "prompt", &out->prompt, reason)) return false;
  if (!parse_text_or_messages(d, "chosen", &out->chosen, reason)) return false;
  if (!parse_text_or_messages(d, "rejected", &out->rejected, reason)) return false;
  if (out->prompt.is_messages != out->chosen.is_messages || out->chosen.is_messages != out->rejected.is_messages) {
    *reason = "\"prompt\", \"chosen\" and \"rejected\" must all be strings or all be message lists";
    return false;
  }
  if (out->prompt.is_messages && !read_extras(d, &out->chat, reason)) return false;
  if (is_empty(out->chosen)) {
    *reason = "empty \"chosen\"";
    return false;
  }
  if (is_empty(out->rejected)) {
    *reason = "empty \"rejected\"";
    return false;
  }
  return true;
}

bool parse_rl(const Value& d, RlRecord* out, std::string* reason) {
  if (!parse_text_or_messages(d, "prompt", &out->prompt, reason)) return false;
  if (out->prompt.is_messages && !read_extras(d, &out->chat, reason)) return false;
  if (is_empty(out->prompt)) {
    *reason = "empty \"prompt\"";
    return false;
  }
  auto it = d.FindMember("answer");
  if (it == d.MemberEnd()) {
    *reason = "missing field \"answer\"";
    return false;
  }
  if (it->value.IsString()) {
    out->answer.assign(it->value.GetString(), it->value.GetStringLength());
  } else if (it->value.IsNumber()) {
    out->answer = json::to_string(it->value);
  } else {
    *reason = std::string("field \"answer\" must be a string or a number, got ") + json::type_name(it->value);
    return false;
  }
  out->record_json = json::to_string(d);
  return true;
}

}  // namespace

bool parse_record(std::string_view line, Format format, Record* out, std::string* reason) {
  size_t bad = first_invalid_utf8(line);
  if (bad != std::string_view::npos) {
    *reason = "invalid UTF-8 at byte " + std::to_string(bad + 1);
    return false;
  }
  // Parse memory reused line after line on each thread: a fresh Document malloc'd (and freed) a 64 KiB
  // value pool and a parse stack for every line.
  struct Arena {
    std::vector<char> values = std::vector<char>(1 << 20), stack = std::vector<char>(256 << 10);
    rapidjson::MemoryPoolAllocator<> value_pool{values.data(), values.size()};
    rapidjson::MemoryPoolAllocator<> stack_pool{stack.data(), stack.size()};
    size_t stack_chunk = 64 << 10;  // stack_pool's chunk capacity (rapidjson's default)
  };
  thread_local Arena arena;
  // A string is decoded on the parse stack before it is copied out, and the stack grows by 1.5x:
  // in a pool of small chunks every step leaves its old copy behind (3x a long line's string in
  // all, until the next line). One chunk the size of the line lets the stack grow in place.
  const size_t stack_chunk = line.size() > (192u << 10) ? line.size() + (64u << 10) : (64u << 10);
  if (stack_chunk != arena.stack_chunk) {
    arena.stack_pool.~MemoryPoolAllocator();  // rapidjson 1.1 has no way to change the chunk size
    new (&arena.stack_pool) rapidjson::MemoryPoolAllocator<>(arena.stack.data(), arena.stack.size(), stack_chunk);
    arena.stack_chunk = stack_chunk;
  }
  arena.value_pool.Clear();  // frees any chunk a long line added; the buffers stay
  arena.stack_pool.Clear();
  rapidjson::GenericDocument<rapidjson::UTF8<>, rapidjson::MemoryPoolAllocator<>, rapidjson::MemoryPoolAllocator<>> d(
      &arena.value_pool, 1024, &arena.stack_pool);
  json::ParseStatus st = json::parse_into(d, line, &arena.stack_pool);  // refuses nesting past json::kMaxDepth
  if (!st.ok()) {
    *reason = "invalid JSON at column " + std::to_string(st.offset + 1) + ": " + st.message();
    return false;
  }
  if (!d.IsObject()) {
    *reason = std::string("expected a JSON object, got ") + json::type_name(d);
    return false;
  }
  // Nothing on the parse stack is needed past the parse (the values live in value_pool): give a
  // long line's decoded strings back before the record copies them out.
  arena.stack_pool.Clear();
  switch (format) {
    case Format::kSft: return parse_sft(d, &out->sft, reason);
    case Format::kPreference: return parse_preference(d, &out->preference, reason);
    case Format::kRl: return parse_rl(d, &out->rl, reason);
  }
  return false;
}

std::vector<SourceFile> expand_sources(const std::vector<config::DataSource>& sources, const std::string& key) {
  std::vector<SourceFile> out;
  for (size_t i = 0; i < sources.size(); ++i) {
    const auto& s = sources[i];
    std::string where = key + "[" + std::to_string(i) + "]";
    if (!std::isfinite(s.weight) || s.weight < 0)
      throw Error(where + ".weight must be a finite number >= 0, got " + std::to_string(s.weight));
    if (s.path.empty()) throw Error(where + ".path is empty");
    glob_t g{};
    int rc = ::glob(s.path.c_str(), GLOB_ERR, nullptr, &g);
    if (rc == GLOB_NOMATCH || (rc == 0 && g.gl_pathc == 0)) {
      globfree(&g);
      throw Error(where + ": `" + s.path + "` matches no file\n---> HINT: paths are relative to the working directory; "
                  "check the spelling or run from the folder the recipe expects");
    }
    if (rc != 0) {
      globfree(&g);
      throw Error(where + ": cannot expand `" + s.path + "`: " + std::strerror(errno));
    }
    std::vector<std::string> paths(g.gl_pathv, g.gl_pathv + g.gl_pathc);
    globfree(&g);
    std::sort(paths.begin(), paths.end());
    for (auto& p : paths) {
      struct stat st {};
      if (::stat(p.c_str(), &st) != 0) throw Error(where + ": cannot stat " + p + ": " + std::strerror(errno));
      if (S_ISDIR(st.st_mode)) throw Error(where + ": " + p + " is a folder\n---> HINT: use a glob such as " + p + "/*.jsonl");
      out.push_back({p, s.weight, static_cast<uint64_t>(st.st_size)});
    }
  }
  if (out.empty()) throw Error(key + " lists no data files\n---> HINT: set " + key + "=[\"file.jsonl\"] or pass --input");
  return out;
}

bool is_blank_line(std::string_view line) {
  return line.find_first_not_of(" \t\r") == std::string_view::npos;
}

LineReader::LineReader(const std::string& path) : path_(path), buf_(1 << 20) {
  f_ = std::fopen(path.c_str(), "rb");
  if (!f_) throw Error("cannot open " + path + ": " + std::strerror(errno));
  struct stat st {};
  seekable_ = ::fstat(fileno(f_), &st) == 0 && S_ISREG(st.st_mode);
}

LineReader::~LineReader() {
  if (f_) std::fclose(f_);
}

// Reads more after the buffered bytes (moved to the front first); false at the end of the file or
// when the buffer is full (a line longer than it).
bool LineReader::fill() {
  if (eof_) return false;
  if (begin_ > 0) {  // keep the partial line at the front
    std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
  }
  if (end_ == buf_.size()) return false;
  size_t n = std::fread(buf_.data() + end_, 1, buf_.size() - end_, f_);
  if (n == 0) {
    if (std::ferror(f_)) throw Error("cannot read " + path_ + ": " + std::strerror(errno));
    eof_ = true;
    return false;
  }
  end_ += n;
  return true;
}

// Where the line at begin_ ends, when that is in the buffer (read further as needed): kLine (*len
// bytes, then "\n"), kLastLine (*len bytes, then the end of the file), kEnd, or kLong (it does not
// fit: the buffer is full with its start).
LineReader::Found LineReader::buffered_line(size_t* len) {
  size_t scanned = 0;  // bytes after begin_ known to hold no "\n"
  for (;;) {
    const char* from = buf_.data() + begin_ + scanned;
    const char* nl = static_cast<const char*>(std::memchr(from, '\n', end_ - begin_ - scanned));
    if (nl) {
      *len = static_cast<size_t>(nl - (buf_.data() + begin_));
      return Found::kLine;
    }
    scanned = end_ - begin_;
    if (!fill()) {
      if (!eof_) return Found::kLong;
      if (end_ == begin_) return Found::kEnd;
      *len = end_ - begin_;
      return Found::kLastLine;
    }
  }
}

// Appends the line that starts at begin_ and does not fit in the buffer to *out.
void LineReader::read_long(std::string* out) {
  const size_t have = end_ - begin_;
  if (!seekable_) {  // a pipe: append as it comes
    out->append(buf_.data() + begin_, have);
    consumed_ += have;
    begin_ = end_ = 0;
    for (;;) {
      if (!fill()) return;  // the end of the file ends the line
      const char* nl = static_cast<const char*>(std::memchr(buf_.data(), '\n', end_));
      size_t n = nl ? static_cast<size_t>(nl - buf_.data()) : end_;
      out->append(buf_.data(), n);
      consumed_ += n + (nl ? 1 : 0);
      begin_ = nl ? n + 1 : end_;
      if (nl) return;
    }
  }
  // A regular file: find the line's end first, then read it into place in one allocation.
  const off_t here = ::ftello(f_);
  std::vector<char> scratch(1 << 20);
  uint64_t rest = 0;
  bool newline = false;
  for (;;) {
    size_t n = std::fread(scratch.data(), 1, scratch.size(), f_);
    if (n == 0) {
      if (std::ferror(f_)) throw Error("cannot read " + path_ + ": " + std::strerror(errno));
      break;
    }
    const char* nl = static_cast<const char*>(std::memchr(scratch.data(), '\n', n));
    if (nl) {
      rest += static_cast<uint64_t>(nl - scratch.data());
      newline = true;
      break;
    }
    rest += n;
  }
  std::clearerr(f_);
  if (here < 0 || ::fseeko(f_, here, SEEK_SET) != 0) throw Error("cannot seek in " + path_ + ": " + std::strerror(errno));
  out->reserve(out->size() + have + rest);
  out->append(buf_.data() + begin_, have);
  const size_t at = out->size();
  out->resize(at + rest);
  if (rest > 0 && std::fread(&(*out)[at], 1, rest, f_) != rest)
    throw Error("cannot read " + path_ + ": " + (std::ferror(f_) ? std::strerror(errno) : "it got shorter while read"));
  if (newline && std::fgetc(f_) != '\n') throw Error("cannot read " + path_ + ": it changed while read");
  if (!newline) eof_ = true;
  consumed_ += have + rest + (newline ? 1 : 0);
  begin_ = end_ = 0;
}

// The found line (kLine or kLastLine, `len` bytes in the buffer), consumed.
std::string_view LineReader::take(Found found, size_t len) {
  std::string_view line(buf_.data() + begin_, len);
  const size_t used = found == Found::kLine ? len + 1 : len;  // and its "\n"
  consumed_ += used;
  begin_ += used;
  return line;
}

bool LineReader::next(std::string_view* line, int64_t* line_no) {
  size_t len = 0;
  const Found found = buffered_line(&len);
  if (found == Found::kEnd) return false;
  if (found == Found::kLong) {
    if (long_.capacity() > (64u << 20)) std::string().swap(long_);  // not kept after a huge line
    long_.clear();
    read_long(&long_);
    *line = long_;
  } else {
    *line = take(found, len);
  }
  if (!line->empty() && line->back() == '\r') line->remove_suffix(1);
  *line_no = ++line_no_;
  return true;
}

bool LineReader::append_next(std::string* out, int64_t* line_no) {
  const size_t start = out->size();
  size_t len = 0;
  const Found found = buffered_line(&len);
  if (found == Found::kEnd) return false;
  if (found == Found::kLong) {
    read_long(out);
  } else {
    out->append(take(found, len));
  }
  if (out->size() > start && out->back() == '\r') out->pop_back();
  *line_no = ++line_no_;
  return true;
}

}  // namespace ptk::data
