#include "core/train/progress.h"

#include <unistd.h>

#include <cstdlib>

#include "core/util/strings.h"

namespace ptk {

Progress::Progress(std::string label, int64_t total, std::string unit, double interval_s, FILE* out)
    : label_(std::move(label)), unit_(std::move(unit)), total_(total), interval_s_(interval_s), out_(out) {
  tty_ = isatty(fileno(out_));
  if (const char* env = std::getenv("PTK_PROGRESS_INTERVAL")) interval_s_ = std::atof(env);
  start_ = last_print_ = std::chrono::steady_clock::now();
}

Progress::~Progress() {
  if (!finished_ && done_ > 0) finish(extra_);
}

std::string Progress::line(int64_t done, double elapsed, const std::string& extra) const {
  char buf[256];
  double rate = elapsed > 0 && done > start_done_ ? (done - start_done_) / elapsed : 0.0;
  std::string s = label_ + " ";
  if (total_ > 0) {
    std::snprintf(buf, sizeof buf, "%lld/%lld %s (%.1f%%)", static_cast<long long>(done),
                  static_cast<long long>(total_), unit_.c_str(), 100.0 * done / total_);
  } else {
    std::snprintf(buf, sizeof buf, "%lld %s", static_cast<long long>(done), unit_.c_str());
  }
  s += buf;
  std::snprintf(buf, sizeof buf, " | %.2f %s/s", rate, unit_.c_str());
  s += buf;
  s += " | elapsed " + format_duration(elapsed);
  if (total_ > 0 && rate > 0 && done < total_) s += " | ETA " + format_duration((total_ - done) / rate);
  if (!extra.empty()) s += " | " + extra;
  return s;
}

void Progress::update(int64_t done, const std::string& extra) {
  done_ = done;
  extra_ = extra;
  auto now = std::chrono::steady_clock::now();
  double since = std::chrono::duration<double>(now - last_print_).count();
  double elapsed = std::chrono::duration<double>(now - start_).count();
  if (tty_) {
    if (since < 0.1 && done < total_) return;
    std::fprintf(out_, "\r\033[K%s", line(done, elapsed, extra).c_str());
    std::fflush(out_);
  } else {
    if (since < interval_s_ && !(total_ > 0 && done >= total_)) return;
    std::fprintf(out_, "%s\n", line(done, elapsed, extra).c_str());
    printed_done_ = done;
    printed_extra_ = extra;
  }
  last_print_ = now;
}

void Progress::message(const std::string& text) {
  if (tty_ && !finished_) {
    double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    std::fprintf(out_, "\r\033[K%s\n%s", text.c_str(), line(done_, elapsed, extra_).c_str());
  } else {
    std::fprintf(out_, "%s\n", text.c_str());
  }
  std::fflush(out_);
}

void Progress::finish(const std::string& extra) {
  if (finished_) return;
  finished_ = true;
  // In logs the last step's line is already there (an eval line may follow it): not twice.
  if (!tty_ && printed_done_ == done_ && (extra.empty() || extra == printed_extra_)) return;
  double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  std::fprintf(out_, tty_ ? "\r\033[K%s\n" : "%s\n", line(done_, elapsed, extra.empty() ? extra_ : extra).c_str());
  std::fflush(out_);
}

}  // namespace ptk
