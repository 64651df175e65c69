// Dataset files as they come: JSONL, a JSON array (`[ {...}, {...} ]`), either one gzip-compressed,
// and Parquet (when built with Arrow). Each yields its records one at a time as JSON object text that
// parse_record (records.h) reads, so every file format gives the same records. Not record parsing
// (records.h), not tokenization (prepare.h).
//
// Memory: one record at a time (a JSON array is scanned, never loaded whole; a Parquet file is read
// one row group at a time). A problem with the file itself (unreadable, not JSON, a JSON array whose
// structure breaks, a Parquet file without the needed columns) throws ptk::Error once, naming the
// file and where; a bad record inside a good file is the caller's per-record error.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace ptk::data {

enum class FileKind { kJsonl, kJsonArray, kParquet };
const char* file_kind_name(FileKind k);  // "JSONL", "JSON array", "Parquet"

// Where a record is: its 1-based number in the file and the line it starts on (JSONL, JSON array;
// 0 for Parquet, whose records are rows).
struct RecordPos {
  int64_t record = 0;
  int64_t line = 0;
};

// "a.jsonl:12" (JSONL: the line), "a.json:record 3 (line 17)", "b.parquet:row 5".
std::string record_position(const std::string& path, FileKind kind, const RecordPos& pos);

class RecordReader {
 public:
  virtual ~RecordReader() = default;
  // Appends the next record's JSON text to *out and sets *pos; false at the end of the file.
  // Blank JSONL lines are passed through (the caller skips them, as before).
  virtual bool append_next(std::string* out, RecordPos* pos) = 0;
  // Bytes of the file on disk consumed so far (compressed bytes for gzip; progress only).
  virtual uint64_t bytes_read() const = 0;
  virtual FileKind kind() const = 0;
  // The columns every record has (Parquet's schema); empty when records may differ (JSON).
  virtual std::vector<std::string> columns() const { return {}; }
};

// Opens `path` by its content: gzip by its magic bytes, Parquet by "PAR1" (or a .parquet name), then
// by the first non-blank character: '[' a JSON array, '{' JSONL. Throws ptk::Error naming the file
// when it cannot be read or is none of these.
std::unique_ptr<RecordReader> open_records(const std::string& path);

// True when this build reads Parquet (Arrow found at configure time).
bool parquet_supported();

}  // namespace ptk::data
