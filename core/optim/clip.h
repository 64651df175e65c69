// Global-norm gradient clipping (torch.nn.utils.clip_grad_norm_) and the NaN/Inf guard.
// Not part of the optimizer so stages can log the norm before deciding to step.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace ptk::optim {

// How the global norm is computed.
enum class NormPath {
  kCpuOrdered,  // per-tensor fp32 norms (at::_foreach_norm), their squares summed in parameter order
                // in fp32, the root in fp64 (float64 result): grad_norm()'s arithmetic before it
                // returned a tensor (2026-12), so CPU runs keep their bits; clipping decides on the host
  kForeach,     // torch.nn.utils.clip_grad_norm_(foreach=True): the fp32 norm of the per-tensor fp32
                // norms, a 0-dim device tensor; clipping multiplies by a device scalar; no host read
};
NormPath norm_path_for(const at::Device& device);  // cpu -> kCpuOrdered, else kForeach

// L2 norm of all gradients together (fp32 accumulation), as a 0-dim tensor on the gradients' device.
// Undefined grads are skipped (none at all: a float64 0 on the CPU); a sparse gradient counts its
// values. The path: norm_path_for(the first gradient's device) unless given.
at::Tensor grad_norm_tensor(const std::vector<at::Tensor>& params);
at::Tensor grad_norm_tensor(const std::vector<at::Tensor>& params, NormPath path);

// Scales every gradient by min(1, max_norm / (norm + 1e-6)) when max_norm > 0, as torch does (one
// at::_foreach_mul_); returns the norm before clipping (as grad_norm_tensor). A non-finite norm
// leaves the gradients as they are (the NaN guard then skips the step).
at::Tensor clip_grad_norm_tensor(const std::vector<at::Tensor>& params, double max_norm);
at::Tensor clip_grad_norm_tensor(const std::vector<at::Tensor>& params, double max_norm, NormPath path);

// The same, read back to the host (one synchronisation).
double grad_norm(const std::vector<at::Tensor>& params);
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
