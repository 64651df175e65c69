#include "core/optim/clip.h"

#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <torch/torch.h>

#include <cmath>

#include "core/util/error.h"

namespace ptk::optim {

namespace {

// The gradients as _foreach_norm takes them: a sparse one by its values (the rows a batch used).
std::vector<at::Tensor> grads_of(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> out;
  for (const auto& p : params) {
    if (!p.grad().defined()) continue;
    const at::Tensor& g = p.grad();
    out.push_back(g.is_sparse() ? g.coalesce().values() : g);
  }
  return out;
}

}  // namespace

NormPath norm_path_for(const at::Device& device) {
  return device.is_cpu() ? NormPath::kCpuOrdered : NormPath::kForeach;
}

at::Tensor grad_norm_tensor(const std::vector<at::Tensor>& params) {
  for (const auto& p : params)
    if (p.grad().defined()) return grad_norm_tensor(params, norm_path_for(p.grad().device()));
  return at::zeros({}, at::kDouble);
}

at::Tensor grad_norm_tensor(const std::vector<at::Tensor>& params, NormPath path) {
  torch::NoGradGuard ng;
  std::vector<at::Tensor> grads = grads_of(params);
  if (grads.empty()) return at::zeros({}, at::kDouble);
  if (!grads.front().device().is_cpu()) path = NormPath::kForeach;  // the ordered sum reads CPU memory
  if (path == NormPath::kCpuOrdered) {
    // Per tensor fp32 norms (as .to(float).norm(2) gave them), then the squares summed in fp32 in
    // parameter order and the root in fp64: what grad_norm() computed before it returned a tensor.
    for (auto& g : grads)
      if (g.scalar_type() != torch::kFloat32) g = g.to(torch::kFloat32);
    std::vector<at::Tensor> norms = at::_foreach_norm(grads, 2);
    float total = 0;
    for (size_t i = 0; i < norms.size(); ++i) {
      const float n = *norms[i].data_ptr<float>();  // CPU memory: no synchronisation
      const float sq = n * n;
      total = i == 0 ? sq : total + sq;
    }
    return at::scalar_tensor(std::sqrt(static_cast<double>(total)), at::TensorOptions().dtype(at::kDouble));
  }
  // torch.nn.utils.clip_grad_norm_(foreach=True): the norm of the per-tensor norms, fp32 on the device.
  std::vector<at::Tensor> norms = at::_foreach_norm(grads, 2, at::kFloat);
  return at::linalg_vector_norm(at::stack(norms), 2);
}

at::Tensor clip_grad_norm_tensor(const std::vector<at::Tensor>& params, double max_norm) {
  for (const auto& p : params)
    if (p.grad().defined()) return clip_grad_norm_tensor(params, max_norm, norm_path_for(p.grad().device()));
  return at::zeros({}, at::kDouble);
}

at::Tensor clip_grad_norm_tensor(const std::vector<at::Tensor>& params, double max_norm, NormPath path) {
  at::Tensor norm = grad_norm_tensor(params, path);
  if (max_norm <= 0) return norm;
  torch::NoGradGuard ng;
  std::vector<at::Tensor> dense, sparse;
  for (const auto& p : params)
    if (p.grad().defined()) (p.grad().is_sparse() ? sparse : dense).push_back(p.grad());
  if (dense.empty() && sparse.empty()) return norm;
  at::Tensor coef;
  if (path == NormPath::kCpuOrdered && norm.device().is_cpu()) {
    // CPU memory: decide on the host, as before, and skip the pass over the gradients when nothing
    // is clipped (the multiply by a double rounds it to the gradients' float, as mul_(double) did).
    const double n = norm.item<double>();
    if (!std::isfinite(n) || max_norm / (n + 1e-6) >= 1.0) return norm;
    coef = at::scalar_tensor(max_norm / (n + 1e-6), at::TensorOptions().dtype(at::kDouble));
  } else {
    // min(1, max_norm / (norm + 1e-6)), 1 where the norm is not finite: a device scalar, no read.
    coef = at::clamp_max(max_norm / (norm + 1e-6), 1.0);
    coef = at::where(at::isfinite(norm), coef, at::ones_like(coef));
  }
  if (!dense.empty()) at::_foreach_mul_(dense, coef);
  for (auto& g : sparse) g.mul_(coef);
  return norm;
}

double grad_norm(const std::vector<at::Tensor>& params) { return grad_norm_tensor(params).item<double>(); }

double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm) {
  return clip_grad_norm_tensor(params, max_norm).item<double>();
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
