// TensorBoard event files written by hand: TFRecord framing (uint64 length, masked CRC32C of the
// length, the bytes, masked CRC32C of the bytes) around tensorflow.Event protobufs encoded by a
// few lines of protobuf wire format (no protobuf library). The first event holds file_version
// "brain.Event:2"; each step is one Event with scalar summaries (Summary.Value.simple_value). What
// TensorBoard, tbparse and `wandb sync --sync-tensorboard` read. Not a general protobuf encoder, not
// thread-safe (one writer per file).
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ptk::tb {

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord uses.
uint32_t crc32c(std::string_view data);
// TFRecord's masked CRC: ((crc >> 15) | (crc << 17)) + 0xa282ead8.
uint32_t masked_crc32c(std::string_view data);
// One TFRecord: length, masked CRC of the length, data, masked CRC of the data.
std::string tfrecord(std::string_view data);

// tensorflow.Event encodings (field numbers from tensorflow/core/util/event.proto and
// summary.proto): wall_time = 1 (double), step = 2 (int64), file_version = 3 (string), summary = 5
// (Summary{repeated Value value = 1}, Value{tag = 1, simple_value = 2 (float)}), session_log = 7
// (SessionLog{status = 1: START = 1}).
std::string file_version_event(double wall_time, const std::string& version = "brain.Event:2");
std::string scalars_event(double wall_time, int64_t step, const std::vector<std::pair<std::string, double>>& scalars);
// SessionLog START at `step`: TensorBoard (EventAccumulator's purge_orphaned_data) drops the events
// read before it at steps >= `step` (what a resumed run redoes), as for a restarted TensorFlow job.
std::string session_start_event(double wall_time, int64_t step);

// The tag TensorBoard shows for a metrics.jsonl name, as transformers' TensorBoardCallback writes
// TRL's logs: "eval/..." and "test/..." kept, anything else under "train/".
std::string tag_of(const std::string& metric);

// One event file per process start: `dir`/events.out.tfevents.<unix seconds>.<host>.<pid>, where the
// seconds (ten digits) are raised past any earlier file's so that name order is start order; opened
// with the file_version event, then a SessionLog START at `start_step` + 1 (the first step this process
// trains: a resumed run's redone steps, or a resume=never rerun's, replace those of earlier files).
// Each write() appends one Event of scalars and flushes it to the OS.
class EventWriter {
 public:
  EventWriter(const std::string& dir, int64_t start_step);
  ~EventWriter();
  EventWriter(const EventWriter&) = delete;
  EventWriter& operator=(const EventWriter&) = delete;

  // Scalars of `step` under tag_of(name); NaN/Inf values are left out.
  void write(int64_t step, const std::vector<std::pair<std::string, double>>& metrics);
  const std::string& path() const { return path_; }

 private:
  void append(const std::string& event);
  std::string path_;
  FILE* f_ = nullptr;
};

}  // namespace ptk::tb
