#include "core/optim/schedule.h"

#include <algorithm>
#include <cmath>

#include "core/util/error.h"

namespace ptk::optim {

double Schedule::lr_at(int64_t step) const {
  if (step < warmup_steps) return lr * static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, warmup_steps));
  if (kind == "constant") return lr;
  double p = static_cast<double>(step - warmup_steps) / static_cast<double>(std::max<int64_t>(1, total_steps - warmup_steps));
  p = std::clamp(p, 0.0, 1.0);
  double factor;
  if (kind == "linear") {
    factor = 1.0 - p;
  } else if (kind == "cosine") {
    factor = 0.5 * (1.0 + std::cos(M_PI * p));
  } else {
    throw Error("unknown lr schedule \"" + kind + "\" (expected constant | linear | cosine)");
  }
  return min_lr + (lr - min_lr) * factor;
}

}  // namespace ptk::optim
