// JSONL records in DESIGN.md's formats (TRL field names), parsed one line at a time with the reason a
// bad line is refused, plus the file side: globs, weights, and a streaming line reader.
// Not tokenization or shard writing (prepare.h), not batching (loader.h).
//
// Threading: parse_record is a pure function (call it from many threads); LineReader is one owner's.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "core/config/options.h"      // DataSource
#include "core/tokenizer/tokenizer.h"  // Message

namespace ptk::data {

// What a prepared folder holds; chosen by the stage (sft | preference | rl), not by the lines.
enum class Format { kSft, kPreference, kRl };
Format parse_format(const std::string& name);  // throws ptk::Error naming the choices
const char* format_name(Format f);

// A prompt, completion or reply: plain text or a chat message list.
struct TextOrMessages {
  bool is_messages = false;
  std::string text;
  std::vector<tokenizer::Message> messages;
};

// Chat messages: role system | user | assistant | tool, content a string (null on an assistant
// message with tool_calls), tool_calls / name / tool_call_id / reasoning_content / ... passed to the
// chat template; a chat record's "tools" (a list, or its JSON text) and "chat_template_kwargs" (an
// object) go to apply_chat_template with it, as in TRL.
// sft lines, by the field present (checked in this order):
//   {"messages": [...]}                  chat; loss on assistant turns only
//   {"prompt": P, "completion": C}       loss on the completion only; P and C both strings or both lists
//   {"text": "..."}                      loss on every token
struct SftRecord {
  enum class Kind { kMessages, kPromptCompletion, kText } kind = Kind::kText;
  std::vector<tokenizer::Message> messages;  // kMessages
  TextOrMessages prompt, completion;         // kPromptCompletion
  std::string text;                          // kText
  tokenizer::ChatExtras chat;                // chat records: "tools", "chat_template_kwargs"
};

// preference lines: {"prompt": P, "chosen": C, "rejected": R}, all strings or all message lists.
struct PreferenceRecord {
  TextOrMessages prompt, chosen, rejected;
  tokenizer::ChatExtras chat;  // chat records: "tools", "chat_template_kwargs"
};

// rl lines: {"prompt": P, "answer": "..."} plus any other fields; P a string or a message list.
struct RlRecord {
  TextOrMessages prompt;
  tokenizer::ChatExtras chat;  // a chat prompt's "tools", "chat_template_kwargs"
  std::string answer;       // a JSON number is kept as its text ("72", "5.5")
  std::string record_json;  // the whole line re-serialised compactly: answer and every extra field
};

struct Record {
  SftRecord sft;
  PreferenceRecord preference;
  RlRecord rl;
};

// Parses one JSONL line as `format`. On a bad line returns false and sets *reason to a one-line
// reason without the file:line prefix, e.g. `missing field "completion"`, `invalid JSON at column
// 12: Missing a comma or '}' after an object member.`, `invalid UTF-8 at byte 7`,
// `messages[1].role "bot" is not one of system, user, assistant, tool`, `empty "completion"`.
bool parse_record(std::string_view line, Format format, Record* out, std::string* reason);

// One file of a dataset after glob expansion.
struct SourceFile {
  std::string path;     // as matched (relative paths stay relative to the working directory)
  double weight = 1.0;  // mixing weight of the DataSource it came from
  uint64_t size = 0;    // bytes
};

// Expands each DataSource (a file or a glob: * ? [..]) to its files, sorted by path within a glob;
// a file matched by two sources is listed twice (weights add up). Throws ptk::Error naming the
// pattern when it matches nothing, when a weight is negative or not finite, or when nothing is listed.
std::vector<SourceFile> expand_sources(const std::vector<config::DataSource>& sources, const std::string& key = "data.train");

// Streams a file's lines with 1-based numbers; "\n" and "\r\n" endings removed. Lines of any length.
// Memory: a 1 MiB buffer; a line longer than that is held once, where the caller asks for it: in a
// regular file the reader first finds where the line ends (reading on without keeping), then reads
// it into place in one allocation; from a pipe it is appended as it comes.
class LineReader {
 public:
  explicit LineReader(const std::string& path);  // throws ptk::Error naming the path
  ~LineReader();
  LineReader(const LineReader&) = delete;
  LineReader& operator=(const LineReader&) = delete;
  // The next line (valid until the next call); false at the end of the file.
  bool next(std::string_view* line, int64_t* line_no);
  // The next line appended to *out (nothing appended at the end of the file, which returns false).
  bool append_next(std::string* out, int64_t* line_no);
  uint64_t bytes_read() const { return consumed_; }

 private:
  enum class Found { kLine, kLastLine, kEnd, kLong };
  Found buffered_line(size_t* len);
  std::string_view take(Found found, size_t len);
  void read_long(std::string* out);
  bool fill();
  std::string path_;
  FILE* f_ = nullptr;
  bool seekable_ = false;
  std::vector<char> buf_;
  std::string long_;  // next()'s storage for a line longer than the buffer
  size_t begin_ = 0, end_ = 0;
  bool eof_ = false;
  int64_t line_no_ = 0;
  uint64_t consumed_ = 0;
};

// True when a line holds only spaces, tabs or "\r" (such lines are skipped without counting).
bool is_blank_line(std::string_view line);

}  // namespace ptk::data
