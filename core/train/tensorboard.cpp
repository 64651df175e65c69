#include "core/train/tensorboard.h"

#include <unistd.h>

#include <dirent.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>

#include "core/util/error.h"
#include "core/util/fs.h"

namespace ptk::tb {
namespace {

struct Crc32cTable {
  uint32_t t[256];
  Crc32cTable() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      t[i] = c;
    }
  }
};

// Protobuf wire format: varint, tag = field << 3 | wire type (0 varint, 1 fixed64, 2 length, 5 fixed32).
void varint(std::string* out, uint64_t v) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}
void key(std::string* out, int field, int wire) { varint(out, static_cast<uint64_t>(field) << 3 | wire); }
void fixed64(std::string* out, int field, double v) {
  key(out, field, 1);
  uint64_t bits;
  std::memcpy(&bits, &v, 8);
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>(bits >> (8 * i)));
}
void fixed32(std::string* out, int field, float v) {
  key(out, field, 5);
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>(bits >> (8 * i)));
}
void bytes(std::string* out, int field, std::string_view b) {
  key(out, field, 2);
  varint(out, b.size());
  out->append(b.data(), b.size());
}
void int64_field(std::string* out, int field, int64_t v) {
  key(out, field, 0);
  varint(out, static_cast<uint64_t>(v));  // int64: negative values take 10 bytes, as protobuf writes them
}

void put_le32(std::string* out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>(v >> (8 * i)));
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string hostname() {
  char h[256] = {0};
  if (gethostname(h, sizeof h - 1) != 0 || h[0] == 0) return "localhost";
  std::string s = h;
  for (char& c : s)
    if (c == '/' || c == ' ') c = '_';
  return s;
}

}  // namespace

uint32_t crc32c(std::string_view data) {
  static const Crc32cTable table;
  uint32_t c = 0xFFFFFFFFu;
  for (unsigned char b : data) c = table.t[(c ^ b) & 0xff] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t masked_crc32c(std::string_view data) {
  uint32_t c = crc32c(data);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

std::string tfrecord(std::string_view data) {
  std::string len;
  uint64_t n = data.size();
  for (int i = 0; i < 8; ++i) len.push_back(static_cast<char>(n >> (8 * i)));
  std::string out = len;
  put_le32(&out, masked_crc32c(len));
  out.append(data.data(), data.size());
  put_le32(&out, masked_crc32c(data));
  return out;
}

std::string file_version_event(double wall_time, const std::string& version) {
  std::string e;
  fixed64(&e, 1, wall_time);
  bytes(&e, 3, version);
  return e;
}

std::string scalars_event(double wall_time, int64_t step, const std::vector<std::pair<std::string, double>>& scalars) {
  std::string summary;
  for (auto& [tag, v] : scalars) {
    std::string value;
    bytes(&value, 1, tag);
    fixed32(&value, 2, static_cast<float>(v));
    bytes(&summary, 1, value);
  }
  std::string e;
  fixed64(&e, 1, wall_time);
  int64_field(&e, 2, step);
  bytes(&e, 5, summary);
  return e;
}

std::string session_start_event(double wall_time, int64_t step) {
  std::string log;
  key(&log, 1, 0);
  varint(&log, 1);  // SessionLog.START
  std::string e;
  fixed64(&e, 1, wall_time);
  int64_field(&e, 2, step);
  bytes(&e, 7, log);
  return e;
}

// TensorBoard reads a folder's event files in name order, and a resumed run's SessionLog START only
// drops what was read before it: a new file must sort after every earlier one. Names carry whole
// seconds, so two starts within one second (or a pid that sorts lower as text) would misorder them;
// the seconds field is therefore max(now, the largest one already in `dir` + 1), ten digits wide.
int64_t next_file_seconds(const std::string& dir, int64_t now) {
  static const std::string prefix = "events.out.tfevents.";
  int64_t next = now;
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      const std::string name = e->d_name;
      if (name.rfind(prefix, 0) != 0) continue;
      int64_t secs = 0;
      size_t i = prefix.size();
      for (; i < name.size() && name[i] >= '0' && name[i] <= '9' && i < prefix.size() + 18; ++i)
        secs = secs * 10 + (name[i] - '0');
      if (i > prefix.size()) next = std::max(next, secs + 1);
    }
    closedir(d);
  }
  return next;
}

std::string tag_of(const std::string& metric) {
  if (metric.rfind("eval/", 0) == 0 || metric.rfind("test/", 0) == 0) return metric;
  return "train/" + metric;
}

EventWriter::EventWriter(const std::string& dir, int64_t start_step) {
  make_dirs(dir);
  const double t = now_s();
  char secs[32];
  std::snprintf(secs, sizeof secs, "%010lld",
                static_cast<long long>(next_file_seconds(dir, static_cast<int64_t>(t))));
  path_ = dir + "/events.out.tfevents." + secs + "." + hostname() + "." + std::to_string(static_cast<long>(getpid()));
  f_ = std::fopen(path_.c_str(), "ab");
  if (!f_) throw Error("cannot open " + path_ + " for writing: " + std::strerror(errno) +
                       "\n---> HINT: make the run folder writable, or set train.tensorboard=false");
  append(file_version_event(t));
  // Steps after start_step are (re)done by this process: TensorBoard drops earlier files' copies.
  append(session_start_event(t, start_step + 1));
}

EventWriter::~EventWriter() {
  if (f_) std::fclose(f_);
}

void EventWriter::append(const std::string& event) {
  std::string rec = tfrecord(event);
  if (std::fwrite(rec.data(), 1, rec.size(), f_) != rec.size() || std::fflush(f_) != 0)
    throw Error("cannot write " + path_ + ": " + std::strerror(errno));
}

void EventWriter::write(int64_t step, const std::vector<std::pair<std::string, double>>& metrics) {
  std::vector<std::pair<std::string, double>> scalars;
  for (auto& [name, v] : metrics)
    if (std::isfinite(v)) scalars.emplace_back(tag_of(name), v);
  if (scalars.empty()) return;
  append(scalars_event(now_s(), step, scalars));
}

}  // namespace ptk::tb
