// Records in docs/DESIGN.md's formats (TRL field names) and the common dataset shapes mapped onto them
// (ShareGPT, Alpaca, implicit-prompt preference pairs, a column mapping), parsed one JSON object at a
// time with the reason a bad one is refused, plus the file side: globs, weights, and a streaming line
// reader (plain or gzip). File formats (JSONL, JSON array, Parquet): readers.h.
// Not tokenization or shard writing (prepare.h), not batching (loader.h).
//
// Threading: parse_record is a pure function (call it from many threads); LineReader is one owner's.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <utility>
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
//   {"conversations": [{"from", "value"}...]}  ShareGPT: the same as "messages" once roles are mapped
//                                        (human|user -> user, gpt|assistant|chatgpt|bard|bing|model ->
//                                        assistant, system -> system; an optional "system" field first)
//   {"prompt": P, "completion": C}       loss on the completion only; P and C both strings or both lists
//   {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}  Alpaca, as LLaMA-Factory
//                                        maps it: [system], (user q, assistant a) per history pair, user
//                                        instruction + "\n" + input (input only when non-empty), assistant
//                                        output; kMessages (loss on every assistant turn)
//   {"text": "..."}                      loss on every token
struct SftRecord {
  enum class Kind { kMessages, kPromptCompletion, kText } kind = Kind::kText;
  std::vector<tokenizer::Message> messages;  // kMessages
  TextOrMessages prompt, completion;         // kPromptCompletion
  std::string text;                          // kText
  tokenizer::ChatExtras chat;                // chat records: "tools", "chat_template_kwargs"
};

// preference lines: {"prompt": P, "chosen": C, "rejected": R}, all strings or all message lists;
// or, without "prompt":
//   {"chosen": C, "rejected": R}         implicit prompt (hh-rlhf): the longest common prefix, exactly as
//                                        TRL's extract_prompt computes it (code points for strings, whole
//                                        messages for lists, one trailing space given back to the replies)
//   {"conversations": [...], "chosen": C, "rejected": R}  ShareGPT (LLaMA-Factory): C and R a {"from",
//                                        "value"} or {"role", "content"} message, a string or a list
//   {"instruction", "input"?, "system"?, "history"?, "chosen", "rejected"} or "output": [C, R, ...]  Alpaca
//                                        (a ranked "output" list: the first two, as ChatGLM-Efficient-Tuning)
struct PreferenceRecord {
  TextOrMessages prompt, chosen, rejected;
  tokenizer::ChatExtras chat;  // chat records: "tools", "chat_template_kwargs"
};

// rl lines: {"prompt": P, "answer": "..."} plus any other fields; P a string or a message list.
// Also {"conversations": [...], "answer"?} (without "answer", a last assistant turn is the answer) and
// Alpaca {"instruction", "input"?, "system"?, "history"?, "answer" or "output"}.
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

// What parse_record needs beyond the format.
struct ParseOptions {
  // data.columns: (ptk's field name, the dataset's column name) pairs; each record's column is renamed
  // to the field before the format is detected (all at once, so names can be swapped).
  const std::vector<std::pair<std::string, std::string>>* columns = nullptr;
  // When set: a 64-bit hash of the record's JSON value (compact, before renaming), the same for the
  // same record in JSONL, a JSON array (any whitespace) or a Parquet row serialised with the same
  // field order. data.eval_split uses it.
  uint64_t* content_hash = nullptr;
};
bool parse_record(std::string_view json, Format format, const ParseOptions& options, Record* out, std::string* reason);

// For a file whose every record has the same columns (Parquet): whether, after `mapping`, they can
// form a record of `format`. False with *need = the shapes the format reads, e.g. `"messages" |
// "conversations" | "prompt" + "completion" | "instruction" + "output" | "text"`.
bool columns_fit(Format format, const std::vector<std::string>& columns,
                 const std::vector<std::pair<std::string, std::string>>& mapping, std::string* need);

// The field names data.columns may map to (ptk's names, every format): messages, conversations, prompt,
// completion, text, chosen, rejected, answer, instruction, input, output, system, history.
const std::vector<std::string>& mappable_fields();

// TRL's extract_prompt on two strings (UTF-8, compared by code point as Python compares str):
// *prompt = the shared prefix, *chosen and *rejected what follows. False (and *reason) when either is
// empty, where TRL fails.
bool extract_prompt(std::string_view chosen, std::string_view rejected, std::string* prompt, std::string* chosen_out,
                    std::string* rejected_out, std::string* reason);
// The same on message lists (messages compared by role and content).
bool extract_prompt(const std::vector<tokenizer::Message>& chosen, const std::vector<tokenizer::Message>& rejected,
                    std::vector<tokenizer::Message>* prompt, std::vector<tokenizer::Message>* chosen_out,
                    std::vector<tokenizer::Message>* rejected_out, std::string* reason);

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
// A gzip file (by its magic bytes, whatever its name) is decompressed as it is read (zlib).
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
  // Bytes of the file consumed: decompressed bytes, or for gzip the compressed bytes read so far.
  uint64_t bytes_read() const;
  bool gzip() const { return gz_ != nullptr; }

 private:
  enum class Found { kLine, kLastLine, kEnd, kLong };
  Found buffered_line(size_t* len);
  std::string_view take(Found found, size_t len);
  void read_long(std::string* out);
  bool fill();
  std::string path_;
  size_t read_some(char* to, size_t n);  // fread or gzread; 0 at the end; throws on an error
  FILE* f_ = nullptr;
  void* gz_ = nullptr;  // gzFile when the file is gzip
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
