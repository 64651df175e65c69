// The file formats of a dataset (see readers.h): JSONL through LineReader, a JSON array scanned one
// element at a time, both plain or gzip. Parquet lives in parquet_reader.cpp (Arrow stays there).
#include "datasets/readers.h"

#include <zlib.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "core/util/error.h"
#include "datasets/records.h"

namespace ptk::data {

#ifdef PTK_HAVE_PARQUET
std::unique_ptr<RecordReader> open_parquet_records(const std::string& path);  // parquet_reader.cpp
bool parquet_supported() { return true; }
#else
bool parquet_supported() { return false; }
#endif

const char* file_kind_name(FileKind k) {
  switch (k) {
    case FileKind::kJsonl: return "JSONL";
    case FileKind::kJsonArray: return "JSON array";
    case FileKind::kParquet: return "Parquet";
  }
  return "?";
}

std::string record_position(const std::string& path, FileKind kind, const RecordPos& pos) {
  switch (kind) {
    case FileKind::kJsonl: return path + ":" + std::to_string(pos.line);
    case FileKind::kJsonArray:
      return path + ":record " + std::to_string(pos.record) + " (line " + std::to_string(pos.line) + ")";
    case FileKind::kParquet: return path + ":row " + std::to_string(pos.record);
  }
  return path;
}

namespace {

// A file's bytes, decompressed when it is gzip (zlib reads plain files as they are).
class ByteSource {
 public:
  explicit ByteSource(const std::string& path) : path_(path) {
    gz_ = gzopen(path.c_str(), "rb");
    if (!gz_) throw Error("cannot open " + path + ": " + std::strerror(errno ? errno : ENOMEM));
    gzbuffer(gz_, 1 << 18);
  }
  ~ByteSource() {
    if (gz_) gzclose(gz_);
  }
  ByteSource(const ByteSource&) = delete;
  ByteSource& operator=(const ByteSource&) = delete;
  // Up to n bytes; 0 at the end. Throws naming the file on a read error or a truncated gzip stream.
  size_t read(char* to, size_t n) {
    int got = gzread(gz_, to, static_cast<unsigned>(std::min<size_t>(n, 1u << 30)));
    int code = Z_OK;
    const char* msg = gzerror(gz_, &code);
    if (got < 0 || (code != Z_OK && code != Z_BUF_ERROR))
      throw Error("cannot read " + path_ + ": " + (code == Z_ERRNO ? std::strerror(errno) : msg) +
                  "\n---> HINT: a .gz file may be damaged; `gzip -t " + path_ + "` checks it");
    if (got == 0 && code == Z_BUF_ERROR)
      throw Error("cannot read " + path_ + " (gzip): the file is truncated\n---> HINT: download it again; `gzip -t " +
                  path_ + "` checks it");
    return static_cast<size_t>(got);
  }
  bool gzip() const { return gzdirect(gz_) == 0; }
  uint64_t offset() const { return static_cast<uint64_t>(std::max<z_off_t>(0, gzoffset(gz_))); }

 private:
  std::string path_;
  gzFile gz_ = nullptr;
};

class JsonlReader : public RecordReader {
 public:
  explicit JsonlReader(const std::string& path) : lines_(path) {}
  bool append_next(std::string* out, RecordPos* pos) override {
    int64_t line = 0;
    if (!lines_.append_next(out, &line)) return false;
    pos->record = ++records_;
    pos->line = line;
    return true;
  }
  uint64_t bytes_read() const override { return lines_.bytes_read(); }
  FileKind kind() const override { return FileKind::kJsonl; }

 private:
  LineReader lines_;
  int64_t records_ = 0;
};

// `[ v, v, ... ]` scanned byte by byte: strings (with their escapes) and bracket depth are tracked so
// each element's text is cut out exactly; the element itself is parsed later (parse_record). What
// is checked here is the array's own structure.
class JsonArrayReader : public RecordReader {
 public:
  explicit JsonArrayReader(const std::string& path) : path_(path), src_(path), buf_(1 << 20) {}

  bool append_next(std::string* out, RecordPos* pos) override {
    if (done_) return false;
    // Before an element: whitespace, then '[' (first), ',' (between) or ']'.
    for (;;) {
      int c = peek();
      if (c < 0) fail_eof();
      if (is_ws(c)) {
        take();
        continue;
      }
      if (!opened_) {
        if (c != '[') fail("expected '[' to start the JSON array", c);
        opened_ = true;
        take();
        continue;
      }
      if (c == ']' && !expect_comma_or_end_) {
        if (records_ > 0) fail("expected a record after ',' (a trailing comma is not JSON)", c);
        close_array();
        return false;
      }
      if (expect_comma_or_end_) {
        if (c == ',') {
          expect_comma_or_end_ = false;
          take();
          continue;
        }
        if (c == ']') {
          close_array();
          return false;
        }
        fail("expected ',' or ']' after record " + std::to_string(records_), c);
      }
      break;
    }
    // One element.
    pos->record = ++records_;
    pos->line = line_;
    const size_t start = out->size();
    int depth = 0;
    bool in_string = false, escape = false;
    for (;;) {
      int c = peek();
      if (c < 0) {
        if (depth == 0 && !in_string) break;  // a bare number or literal last: the ']' check reports it
        throw Error(path_ + ": the file ends inside record " + std::to_string(records_) + " (which starts at line " +
                    std::to_string(pos->line) + "): the JSON array is cut short or a bracket or quote is missing");
      }
      if (in_string) {
        if (escape) escape = false;
        else if (c == '\\') escape = true;
        else if (c == '"') in_string = false;
      } else if (c == '"') {
        in_string = true;
      } else if (c == '{' || c == '[') {
        ++depth;
      } else if (c == '}' || c == ']') {
        if (depth == 0) break;  // the array's ']' after a bare value
        --depth;
      } else if (depth == 0 && (c == ',' || is_ws(c))) {
        break;
      }
      out->push_back(static_cast<char>(c));
      take();
      if (out->size() - start > kMaxRecord)
        throw Error(record_position(path_, FileKind::kJsonArray, *pos) + ": a record over 1 GiB\n---> HINT: is this a JSON "
                    "array of records? Split the file");
      if (depth == 0 && !in_string && (c == '}' || c == ']' || c == '"')) break;  // the element closed
    }
    expect_comma_or_end_ = true;
    return true;
  }
  uint64_t bytes_read() const override { return src_.gzip() ? src_.offset() : consumed_; }
  FileKind kind() const override { return FileKind::kJsonArray; }

 private:
  static constexpr size_t kMaxRecord = size_t{1} << 30;
  static bool is_ws(int c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
  int peek() {
    if (at_ == end_) {
      end_ = src_.read(buf_.data(), buf_.size());
      at_ = 0;
      if (end_ == 0) return -1;
    }
    return static_cast<unsigned char>(buf_[at_]);
  }
  void take() {
    if (buf_[at_] == '\n') ++line_;
    ++at_;
    ++consumed_;
  }
  void close_array() {
    take();  // ']'
    done_ = true;
    for (int c = peek(); c >= 0; c = peek()) {
      if (!is_ws(c)) fail("expected nothing after the JSON array's closing ']'", c);
      take();
    }
  }
  [[noreturn]] void fail(const std::string& what, int c) {
    std::string got = c >= 0x20 && c < 0x7f ? std::string("'") + static_cast<char>(c) + "'" : "byte " + std::to_string(c);
    throw Error(path_ + ":" + std::to_string(line_) + ": not a valid JSON array: " + what + ", got " + got +
                "\n---> HINT: check the file with `python3 -m json.tool " + path_ + " > /dev/null`");
  }
  [[noreturn]] void fail_eof() {
    throw Error(path_ + ": the file ends before the JSON array's closing ']' (after record " + std::to_string(records_) +
                ")\n---> HINT: the file is cut short");
  }

  std::string path_;
  ByteSource src_;
  std::vector<char> buf_;
  size_t at_ = 0, end_ = 0;
  uint64_t consumed_ = 0;
  int64_t line_ = 1, records_ = 0;
  bool opened_ = false, expect_comma_or_end_ = false, done_ = false;
};

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

std::unique_ptr<RecordReader> open_records(const std::string& path) {
  // The first bytes: Parquet's magic, else the first non-blank character (after gzip, after a BOM).
  char head[4] = {0, 0, 0, 0};
  size_t n_head = 0;
  int first = -1;
  bool gzip = false;
  {
    ByteSource src(path);
    gzip = src.gzip();
    char buf[4096];
    size_t n;
    bool bom_checked = false;
    while (first < 0 && (n = src.read(buf, sizeof buf)) > 0) {
      size_t i = 0;
      if (!bom_checked) {
        for (size_t k = 0; k < 4 && k < n; ++k) head[k] = buf[k];
        n_head = std::min<size_t>(n, 4);
        if (n >= 3 && static_cast<unsigned char>(buf[0]) == 0xEF && static_cast<unsigned char>(buf[1]) == 0xBB &&
            static_cast<unsigned char>(buf[2]) == 0xBF)
          throw Error(path + ": starts with a UTF-8 byte order mark\n---> HINT: save it without one (e.g. `sed -i "
                      "'1s/^\\xEF\\xBB\\xBF//' " + path + "`)");
        bom_checked = true;
      }
      for (; i < n; ++i) {
        if (buf[i] != ' ' && buf[i] != '\t' && buf[i] != '\n' && buf[i] != '\r') {
          first = static_cast<unsigned char>(buf[i]);
          break;
        }
      }
    }
  }
  const bool parquet_magic = n_head == 4 && std::memcmp(head, "PAR1", 4) == 0;
  if (parquet_magic || ends_with(path, ".parquet")) {
    if (gzip) throw Error(path + ": a gzip-compressed Parquet file\n---> HINT: decompress it (Parquet compresses its own pages)");
#ifdef PTK_HAVE_PARQUET
    return open_parquet_records(path);
#else
    throw Error(path + ": Parquet, and this build of ptk reads no Parquet\n---> HINT: convert it: python3 -c \"import "
                "pandas; pandas.read_parquet('" + path + "').to_json('out.jsonl', orient='records', lines=True, "
                "force_ascii=False)\", or rebuild ptk with pyarrow in .venv (scripts/setup.sh)");
#endif
  }
  if (first == '[') return std::make_unique<JsonArrayReader>(path);
  if (first == '{' || first < 0) return std::make_unique<JsonlReader>(path);  // an empty file has no records
  std::string got = first >= 0x20 && first < 0x7f ? std::string("'") + static_cast<char>(first) + "'"
                                                   : "byte " + std::to_string(first);
  throw Error(path + ": not JSON (" + (gzip ? "after gzip, " : "") + "the first character is " + got +
              ")\n---> HINT: ptk reads JSONL (one object a line), a JSON array of objects, either gzip-compressed, "
              "and Parquet");
}

}  // namespace ptk::data
