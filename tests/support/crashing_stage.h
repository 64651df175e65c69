// A simulated crash for resume tests of real stages: a train::Stage that delegates every call to
// another stage and throws test::Crash when the trainer asks for micro-batch number `crash_at`
// (counted from 1 in this process). Test code only.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "core/train/trainer.h"

namespace ptk::test {

struct Crash : std::runtime_error {
  Crash() : std::runtime_error("simulated crash") {}
};

// flops_per_token() is not forwarded: its default 0 spares the trainer's one-second matmul
// measurement for MFU, a timing metric no resume test compares.
class CrashingStage : public train::Stage {
 public:
  CrashingStage(train::Stage& s, int64_t crash_at) : s_(s), crash_at_(crash_at) {}
  void set_rank(int r, int w) override { s_.set_rank(r, w); }
  optim::NamedTensors parameters() override { return s_.parameters(); }
  int64_t micro_batches_per_epoch() const override { return s_.micro_batches_per_epoch(); }
  train::MicroBatch next_micro_batch() override {
    if (++n_ == crash_at_) throw Crash();
    return s_.next_micro_batch();
  }
  std::string cursor_json() const override { return s_.cursor_json(); }
  void restore_cursor(const std::string& j) override { s_.restore_cursor(j); }
  train::LossOut loss(const train::MicroBatch& mb, double n) override { return s_.loss(mb, n); }
  void evaluate(Metrics* out) override { s_.evaluate(out); }
  void save_model(const std::string& dir) override { s_.save_model(dir); }

 private:
  train::Stage& s_;
  int64_t crash_at_, n_ = 0;
};

}  // namespace ptk::test
