#include "core/optim/clip.h"

#include <torch/torch.h>

#include <cmath>

#include "core/util/error.h"

namespace ptk::optim {

double grad_norm(const std::vector<at::Tensor>& params) {
  torch::NoGradGuard ng;
  at::Tensor total;
  for (const auto& p : params) {
    if (!p.grad().defined()) continue;
    const at::Tensor& g = p.grad();
    at::Tensor n = (g.is_sparse() ? g.coalesce().values() : g).to(torch::kFloat32).norm(2);
    total = total.defined() ? total + n * n : n * n;
  }
  return total.defined() ? std::sqrt(total.item<double>()) : 0.0;
}

double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm) {
  double norm = grad_norm(params);
  if (max_norm > 0 && std::isfinite(norm)) {
    double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0) {
      torch::NoGradGuard ng;
      for (const auto& p : params)
        if (p.grad().defined()) p.grad().mul_(coef);
    }
  }
  return norm;
}

bool NanGuard::check(double norm, int64_t step) {
  if (std::isfinite(norm)) {
    consecutive_ = 0;
    return true;
  }
  ++consecutive_;
  ++total_;
  if (consecutive_ >= max_)
    throw Error("gradient norm was " + std::to_string(norm) + " for " + std::to_string(consecutive_) +
                " optimizer steps in a row (last: step " + std::to_string(step) +
                "); stopping.\n---> HINT: lower optim.lr, raise optim.warmup_steps, or check the data "
                "for empty or degenerate records; the last complete checkpoint is intact.");
  return false;
}

}  // namespace ptk::optim
