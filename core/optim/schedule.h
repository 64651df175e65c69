// Learning-rate schedules with linear warmup and a floor, as Hugging Face's get_*_schedule_with_warmup
// (and cosine_with_min_lr) define them: the lr of optimizer step k (0-based) is lr_at(k).
// Not an optimizer: pass the value to AdamW::step.
#pragma once
#include <cstdint>
#include <string>

namespace ptk::optim {

struct Schedule {
  std::string kind = "cosine";  // constant | linear | cosine
  double lr = 1e-5;             // peak, reached at the end of warmup
  double min_lr = 0.0;          // floor of the decay (linear and cosine)
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;

  // Warmup: lr * k / warmup (0 at k = 0, as HF). Then, with p = (k - warmup) / (total - warmup):
  // constant lr; linear min_lr + (lr - min_lr)(1 - p); cosine min_lr + (lr - min_lr) * (1 + cos(pi p)) / 2.
  double lr_at(int64_t step) const;
};

}  // namespace ptk::optim
