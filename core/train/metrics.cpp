#include "core/train/metrics.h"

#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>

#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"

namespace ptk {

std::string Metrics::to_json(int64_t step) const {
  rapidjson::StringBuffer buf;
  rapidjson::Writer<rapidjson::StringBuffer> w(buf);
  w.StartObject();
  w.Key("step");
  w.Int64(step);
  for (auto& [k, v] : values_) {
    w.Key(k.c_str());
    if (!std::isfinite(v)) {
      w.Null();
    } else if (std::floor(v) == v && std::fabs(v) < 9e15) {
      w.Int64(static_cast<int64_t>(v));
    } else {
      w.Double(v);
    }
  }
  w.EndObject();
  return std::string(buf.GetString(), buf.GetSize());
}

MetricsWriter::MetricsWriter(const std::string& path, int64_t truncate_after_step) : path_(path) {
  make_dirs(parent_dir(path));
  if (truncate_after_step >= 0 && path_exists(path)) {
    check_regular_file(path);  // a FIFO would block the open below (and the append after) forever
    std::ifstream in(path);
    std::string line, kept;
    while (std::getline(in, line)) {
      rapidjson::Document d;
      if (!json::parse_into(d, line).ok() || !d.IsObject()) continue;  // a torn last line from a crash
      auto s = d.FindMember("step");
      if (s != d.MemberEnd() && s->value.IsInt64() && s->value.GetInt64() > truncate_after_step) continue;
      kept += line + "\n";
    }
    write_file_atomic(path, kept);
  }
  f_ = std::fopen(path.c_str(), "a");
  if (!f_) throw Error("cannot open " + path + " for appending: " + std::strerror(errno));
}

MetricsWriter::~MetricsWriter() {
  if (f_) std::fclose(f_);
}

void MetricsWriter::write(int64_t step, const Metrics& m) {
  std::string line = m.to_json(step) + "\n";
  if (std::fwrite(line.data(), 1, line.size(), f_) != line.size() || std::fflush(f_) != 0)
    throw Error("cannot write " + path_ + ": " + std::strerror(errno));
}

}  // namespace ptk
