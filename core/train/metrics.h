// metrics.jsonl: one JSON object per line, flushed per line so a crash loses nothing already
// logged. Not a plotting or aggregation tool (see `ptk plot`). Not thread-safe: one writer per run.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

namespace ptk {

// Ordered name/value pairs; keys keep insertion order in the output.
class Metrics {
 public:
  Metrics& add(std::string name, double value) {
    values_.emplace_back(std::move(name), value);
    return *this;
  }
  const std::vector<std::pair<std::string, double>>& values() const { return values_; }
  // NaN/Inf are written as null (JSON has no NaN).
  std::string to_json(int64_t step) const;

 private:
  std::vector<std::pair<std::string, double>> values_;
};

class MetricsWriter {
 public:
  // Appends to `path` (creates it). With `truncate_after_step` >= 0, lines of later steps are
  // dropped first, so a resumed run does not duplicate the steps it redoes.
  explicit MetricsWriter(const std::string& path, int64_t truncate_after_step = -1);
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;

  void write(int64_t step, const Metrics& m);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  FILE* f_ = nullptr;
};

}  // namespace ptk
