// The progress line every long job prints: done/total, rate with units, elapsed and ETA.
// On a TTY it redraws in place (at most 10 times a second); in logs it prints a plain line every
// `interval_s` seconds (PTK_PROGRESS_INTERVAL overrides). Not thread-safe: one owner thread.
#pragma once
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace ptk {

class Progress {
 public:
  // `unit` names what `done` counts ("steps", "samples", "tokens").
  Progress(std::string label, int64_t total, std::string unit, double interval_s = 10.0, FILE* out = stderr);
  ~Progress();

  // `done` is absolute; `extra` is appended (e.g. "loss 1.234").
  void update(int64_t done, const std::string& extra = "");
  // Work done before this process started (a resumed run's step): counted in done/total, not in
  // the rate or the ETA, which measure this process only.
  void set_start(int64_t done) { start_done_ = done; }
  // Final line (always printed).
  void finish(const std::string& extra = "");
  // A line of its own (an eval result) between progress lines; on a TTY the redrawn progress line
  // is cleared first and drawn again below it.
  void message(const std::string& text);

  // The text of a line, exposed for tests.
  std::string line(int64_t done, double elapsed_s, const std::string& extra) const;
  bool is_tty() const { return tty_; }

 private:
  std::string label_, unit_;
  int64_t total_;
  double interval_s_;
  FILE* out_;
  bool tty_;
  bool finished_ = false;
  int64_t done_ = 0;
  int64_t start_done_ = 0;
  int64_t printed_done_ = -1;   // the `done` of the last plain (non-TTY) line
  std::string printed_extra_;
  std::string extra_;
  std::chrono::steady_clock::time_point start_, last_print_;
};

}  // namespace ptk
