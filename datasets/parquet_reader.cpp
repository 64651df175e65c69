// Parquet records (readers.h) through Apache Arrow's C++ library from the pyarrow wheel (cmake/PtkArrow.cmake).
// Each row is serialised to a compact JSON object (column name -> value; lists as arrays, structs as
// objects, maps as objects, nulls as null) that parse_record reads exactly like a JSONL line, so a
// Parquet file and the same records in JSONL prepare to the same bytes. Rows are read in batches
// of 1,024 within one row group at a time: memory is bounded by a row group, not the file.
// Compiled as C++20 (Arrow's headers need it); nothing of Arrow leaves this file.
#include <arrow/api.h>
#include <arrow/io/file.h>
#include <parquet/arrow/reader.h>
#include <parquet/exception.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/util/error.h"
#include "datasets/readers.h"

namespace ptk::data {

namespace {

using Writer = rapidjson::Writer<rapidjson::StringBuffer>;

std::string status_text(const arrow::Status& s) { return s.ToString(); }

// One value of `a` at row `i` as JSON.
void write_value(const arrow::Array& a, int64_t i, Writer& w) {
  if (a.IsNull(i)) {
    w.Null();
    return;
  }
  using T = arrow::Type;
  switch (a.type_id()) {
    case T::NA: w.Null(); return;
    case T::BOOL: w.Bool(static_cast<const arrow::BooleanArray&>(a).Value(i)); return;
    case T::INT8: w.Int(static_cast<const arrow::Int8Array&>(a).Value(i)); return;
    case T::INT16: w.Int(static_cast<const arrow::Int16Array&>(a).Value(i)); return;
    case T::INT32: w.Int(static_cast<const arrow::Int32Array&>(a).Value(i)); return;
    case T::INT64: w.Int64(static_cast<const arrow::Int64Array&>(a).Value(i)); return;
    case T::UINT8: w.Uint(static_cast<const arrow::UInt8Array&>(a).Value(i)); return;
    case T::UINT16: w.Uint(static_cast<const arrow::UInt16Array&>(a).Value(i)); return;
    case T::UINT32: w.Uint(static_cast<const arrow::UInt32Array&>(a).Value(i)); return;
    case T::UINT64: w.Uint64(static_cast<const arrow::UInt64Array&>(a).Value(i)); return;
    case T::FLOAT:
    case T::DOUBLE: {
      double x = a.type_id() == T::FLOAT ? static_cast<const arrow::FloatArray&>(a).Value(i)
                                          : static_cast<const arrow::DoubleArray&>(a).Value(i);
      if (!std::isfinite(x)) w.Null();  // JSON has no NaN or infinity (pandas writes them as null)
      else w.Double(x);
      return;
    }
    case T::STRING:
    case T::BINARY: {
      auto v = static_cast<const arrow::BinaryArray&>(a).GetView(i);
      w.String(v.data(), static_cast<rapidjson::SizeType>(v.size()), true);
      return;
    }
    case T::LARGE_STRING:
    case T::LARGE_BINARY: {
      auto v = static_cast<const arrow::LargeBinaryArray&>(a).GetView(i);
      w.String(v.data(), static_cast<rapidjson::SizeType>(v.size()), true);
      return;
    }
    case T::STRING_VIEW:
    case T::BINARY_VIEW: {
      auto v = static_cast<const arrow::BinaryViewArray&>(a).GetView(i);
      w.String(v.data(), static_cast<rapidjson::SizeType>(v.size()), true);
      return;
    }
    case T::LIST: {
      const auto& l = static_cast<const arrow::ListArray&>(a);
      w.StartArray();
      for (int64_t k = l.value_offset(i); k < l.value_offset(i) + l.value_length(i); ++k) write_value(*l.values(), k, w);
      w.EndArray();
      return;
    }
    case T::LARGE_LIST: {
      const auto& l = static_cast<const arrow::LargeListArray&>(a);
      w.StartArray();
      for (int64_t k = l.value_offset(i); k < l.value_offset(i) + l.value_length(i); ++k) write_value(*l.values(), k, w);
      w.EndArray();
      return;
    }
    case T::FIXED_SIZE_LIST: {
      const auto& l = static_cast<const arrow::FixedSizeListArray&>(a);
      w.StartArray();
      for (int64_t k = l.value_offset(i); k < l.value_offset(i) + l.value_length(i); ++k) write_value(*l.values(), k, w);
      w.EndArray();
      return;
    }
    case T::STRUCT: {
      const auto& s = static_cast<const arrow::StructArray&>(a);
      const auto& type = static_cast<const arrow::StructType&>(*s.type());
      w.StartObject();
      for (int f = 0; f < type.num_fields(); ++f) {
        const std::string& name = type.field(f)->name();
        w.Key(name.data(), static_cast<rapidjson::SizeType>(name.size()), true);
        write_value(*s.field(f), i, w);
      }
      w.EndObject();
      return;
    }
    case T::MAP: {
      const auto& m = static_cast<const arrow::MapArray&>(a);
      w.StartObject();
      for (int64_t k = m.value_offset(i); k < m.value_offset(i) + m.value_length(i); ++k) {
        auto key = m.keys()->GetScalar(k);
        std::string ks = key.ok() ? (*key)->ToString() : "?";
        w.Key(ks.data(), static_cast<rapidjson::SizeType>(ks.size()), true);
        write_value(*m.items(), k, w);
      }
      w.EndObject();
      return;
    }
    case T::DICTIONARY: {
      const auto& d = static_cast<const arrow::DictionaryArray&>(a);
      write_value(*d.dictionary(), d.GetValueIndex(i), w);
      return;
    }
    default: {  // dates, timestamps, decimals...: their text, as pandas' to_json would not promise either
      auto sc = a.GetScalar(i);
      std::string s = sc.ok() ? (*sc)->ToString() : "";
      w.String(s.data(), static_cast<rapidjson::SizeType>(s.size()), true);
      return;
    }
  }
}

class ParquetReader : public RecordReader {
 public:
  explicit ParquetReader(const std::string& path) : path_(path) {
    auto file = arrow::io::ReadableFile::Open(path);
    if (!file.ok()) throw Error("cannot open " + path + ": " + status_text(file.status()));
    file_ = *file;
    try {
      auto reader = parquet::arrow::OpenFile(file_, arrow::default_memory_pool());
      if (!reader.ok()) throw Error(path + ": not a readable Parquet file: " + status_text(reader.status()));
      reader_ = std::move(*reader);
      reader_->set_batch_size(1024);
      auto batches = reader_->GetRecordBatchReader();
      if (!batches.ok()) throw Error(path + ": cannot read its row groups: " + status_text(batches.status()));
      batches_ = std::move(*batches);
    } catch (const parquet::ParquetException& e) {
      throw Error(path + ": not a readable Parquet file: " + e.what());
    }
    for (const auto& f : batches_->schema()->fields()) names_.push_back(f->name());
  }

  bool append_next(std::string* out, RecordPos* pos) override {
    while (!batch_ || at_ >= batch_->num_rows()) {
      std::shared_ptr<arrow::RecordBatch> next;
      arrow::Status st;
      try {
        st = batches_->ReadNext(&next);
      } catch (const parquet::ParquetException& e) {
        throw Error(path_ + ": cannot read row " + std::to_string(row_ + 1) + ": " + e.what());
      }
      if (!st.ok()) throw Error(path_ + ": cannot read row " + std::to_string(row_ + 1) + ": " + status_text(st));
      if (!next) return false;
      batch_ = std::move(next);
      at_ = 0;
    }
    sb_.Clear();
    Writer w(sb_);
    w.StartObject();
    for (int c = 0; c < batch_->num_columns(); ++c) {
      // A null column is left out, as a JSONL record without that field (a Parquet table has every
      // column in every row: `datasets` fills the fields a record lacks with null).
      if (batch_->column(c)->IsNull(at_)) continue;
      w.Key(names_[c].data(), static_cast<rapidjson::SizeType>(names_[c].size()), true);
      write_value(*batch_->column(c), at_, w);
    }
    w.EndObject();
    out->append(sb_.GetString(), sb_.GetSize());
    ++at_;
    pos->record = ++row_;
    pos->line = 0;
    return true;
  }
  uint64_t bytes_read() const override {
    auto size = file_->GetSize();
    if (!size.ok() || !reader_) return 0;
    const int64_t rows = reader_->parquet_reader()->metadata()->num_rows();
    return rows > 0 ? static_cast<uint64_t>(static_cast<double>(*size) * static_cast<double>(row_) / rows) : 0;
  }
  FileKind kind() const override { return FileKind::kParquet; }
  std::vector<std::string> columns() const override { return names_; }

 private:
  std::string path_;
  std::shared_ptr<arrow::io::ReadableFile> file_;
  std::unique_ptr<parquet::arrow::FileReader> reader_;
  std::unique_ptr<arrow::RecordBatchReader> batches_;
  std::shared_ptr<arrow::RecordBatch> batch_;
  std::vector<std::string> names_;
  rapidjson::StringBuffer sb_;
  int64_t at_ = 0, row_ = 0;
};

}  // namespace

std::unique_ptr<RecordReader> open_parquet_records(const std::string& path) { return std::make_unique<ParquetReader>(path); }

}  // namespace ptk::data
