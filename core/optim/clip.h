// Global-norm gradient clipping (torch.nn.utils.clip_grad_norm_) and the NaN/Inf guard.
// Not part of the optimizer so stages can log the norm before deciding to step.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace ptk::optim {

// L2 norm of all gradients together (fp32 accumulation). Undefined grads are skipped.
double grad_norm(const std::vector<at::Tensor>& params);

// Scales every gradient by min(1, max_norm / (norm + 1e-6)) when max_norm > 0, as torch does;
// returns the norm before clipping.
double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm);

// Skips optimizer steps whose gradient norm is not finite; after `max_consecutive` such steps in
// a row, throws ptk::Error with advice.
class NanGuard {
 public:
  explicit NanGuard(int max_consecutive = 5) : max_(max_consecutive) {}
  // True when the step may go ahead; false: skip it (the caller zeroes the gradients).
  bool check(double norm, int64_t step);
  int64_t skipped_total() const { return total_; }

 private:
  int max_;
  int consecutive_ = 0;
  int64_t total_ = 0;
};

}  // namespace ptk::optim
