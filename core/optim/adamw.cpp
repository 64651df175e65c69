#include "core/optim/adamw.h"

#include <ATen/Parallel.h>
#include <ATen/ops/_foreach_copy.h>
#include <ATen/ops/_fused_adamw.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>

#include "core/util/error.h"

namespace ptk::optim {

bool is_no_decay(const std::string& name) {
  auto ends_with = [&](const char* s) {
    std::string suf(s);
    return name.size() >= suf.size() && name.compare(name.size() - suf.size(), suf.size(), suf) == 0;
  };
  return ends_with(".bias") || ends_with("norm.weight") || ends_with("layernorm.weight");
}

at::Tensor dense_grad(const at::Tensor& g) { return g.is_sparse() ? g.to_dense() : g; }

AdamWPath adamw_path_for(const at::Device& device) {
  if (device.is_cpu()) return AdamWPath::kCpuFused;
  if (device.is_cuda()) return AdamWPath::kMultiTensor;
  return AdamWPath::kReference;
}

const char* adamw_path_name(AdamWPath path) {
  switch (path) {
    case AdamWPath::kCpuFused: return "cpu_fused";
    case AdamWPath::kMultiTensor: return "multi_tensor";
    case AdamWPath::kReference: return "reference";
  }
  return "?";
}

void AdamW::set_fused(bool fused) {
  path_ = !fused ? AdamWPath::kReference
                 : adamw_path_for(params_.empty() ? at::Device(at::kCPU) : params_.front().second.device());
}

AdamW::AdamW(NamedTensors params, AdamWOptions opt) : params_(std::move(params)), opt_(opt) {
  torch::NoGradGuard ng;
  set_fused(true);
  for (auto& [name, p] : params_) {
    Slot s;
    auto f32 = p.options().dtype(torch::kFloat32);
    s.exp_avg = torch::zeros(p.sizes(), f32);
    s.exp_avg_sq = torch::zeros(p.sizes(), f32);
    if (p.scalar_type() != torch::kFloat32) s.master = p.detach().to(torch::kFloat32).clone();
    s.weight_decay = (!opt_.decay_norms_and_biases && is_no_decay(name)) ? 0.0 : opt_.weight_decay;
    slots_.push_back(std::move(s));
  }
}

void AdamW::zero_grad() {
  for (auto& [name, p] : params_) {
    if (p.grad().defined()) p.mutable_grad().reset();
  }
}

namespace {

// One pass over fp32 contiguous CPU memory: the same arithmetic, in the same order, as
// torch.optim.AdamW's single-tensor path (mul_, lerp_, mul_/addcmul_, sqrt/div/add, addcdiv_).
// A plain function of restrict pointers and scalars by value, so GCC vectorises it whether or not
// it is inlined into OpenMP's outlined region (through the lambda's captures it stayed scalar under
// -fopenmp: 1.64 s vs 0.75 s a step at 0.5B on one thread).
void adamw_range(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
                 int64_t begin, int64_t end, float decay_mul, float one_minus_b1, float b2, float one_minus_b2,
                 float bc2_sqrt, float eps, float neg_step_size) {
  for (int64_t i = begin; i < end; ++i) {
    float pi = p[i] * decay_mul;
    float gi = g[i];
    float mi = m[i];
    mi = mi + one_minus_b1 * (gi - mi);  // lerp with weight < 0.5
    float vi = v[i] * b2 + one_minus_b2 * gi * gi;
    float denom = std::sqrt(vi) / bc2_sqrt + eps;
    p[i] = pi + neg_step_size * (mi / denom);
    m[i] = mi;
    v[i] = vi;
  }
}

void fused_adamw_cpu(float* p, const float* g, float* m, float* v, int64_t n, float decay_mul, float one_minus_b1,
                     float b2, float one_minus_b2, float bc2_sqrt, float eps, float neg_step_size) {
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    adamw_range(p, g, m, v, begin, end, decay_mul, one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, neg_step_size);
  });
}

}  // namespace

// torch.optim.AdamW(fused=True)'s _fused_adam: at::_fused_adamw_ calls per weight-decay group over
// the fp32 weights (the masters of bf16 parameters), fp32 gradients and moments, the step count as a
// device tensor; the learning rate and betas as host scalars, so nothing is read back. bf16 gradients
// are cast to fp32 copies first; a call takes at most kCastBytes of such copies, so the transient
// memory stays small (one call per group when the gradients are fp32).
void AdamW::step_multi_tensor(double lr) {
  const double kCastBytes = cast_chunk_bytes_;
  std::vector<double> decays;
  for (const Slot& s : slots_)
    if (std::find(decays.begin(), decays.end(), s.weight_decay) == decays.end()) decays.push_back(s.weight_decay);
  std::vector<at::Tensor> low, masters;  // bf16 parameters and their masters, refreshed after the update
  for (double wd : decays) {
    std::vector<at::Tensor> ws, gs, ms, vs, steps;
    double cast_bytes = 0;
    auto flush = [&] {
      if (ws.empty()) return;
      at::_fused_adamw_(ws, gs, ms, vs, /*max_exp_avg_sqs=*/{}, steps, lr, opt_.beta1, opt_.beta2, wd, opt_.eps,
                        /*amsgrad=*/false, /*maximize=*/false);
      ws.clear(), gs.clear(), ms.clear(), vs.clear(), steps.clear();
      cast_bytes = 0;
    };
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& p = params_[i].second;
      Slot& s = slots_[i];
      if (s.weight_decay != wd || !p.grad().defined()) continue;
      at::Tensor w = s.master.defined() ? s.master : p.detach();
      if (!step_tensor_.defined() || step_tensor_.device() != w.device()) {
        step_tensor_ = at::zeros({}, w.options().dtype(torch::kFloat32));
        step_tensor_.fill_(static_cast<double>(step_));
      }
      at::Tensor grad = dense_grad(p.grad());
      if (grad.scalar_type() != torch::kFloat32) {
        grad = grad.to(torch::kFloat32);
        cast_bytes += 4.0 * static_cast<double>(grad.numel());
      }
      ws.push_back(w);
      gs.push_back(grad.contiguous());
      ms.push_back(s.exp_avg);
      vs.push_back(s.exp_avg_sq);
      steps.push_back(step_tensor_);
      if (s.master.defined()) {
        low.push_back(p.detach());
        masters.push_back(s.master);
      }
      if (cast_bytes >= kCastBytes) flush();
    }
    flush();
  }
  if (!low.empty()) at::_foreach_copy_(low, masters);
}

void AdamW::step(double lr) {
  torch::NoGradGuard ng;
  ++step_;
  if (path_ == AdamWPath::kMultiTensor) {
    if (step_tensor_.defined()) step_tensor_.fill_(static_cast<double>(step_));  // no read: a fill kernel
    step_multi_tensor(lr);
    return;
  }
  const bool fused = path_ == AdamWPath::kCpuFused;
  const double b1 = opt_.beta1, b2 = opt_.beta2;
  const double bc1 = 1.0 - std::pow(b1, static_cast<double>(step_));
  const double bc2 = 1.0 - std::pow(b2, static_cast<double>(step_));
  const double step_size = lr / bc1;
  const double bc2_sqrt = std::sqrt(bc2);
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor& p = params_[i].second;
    Slot& s = slots_[i];
    if (!p.grad().defined()) continue;
    at::Tensor grad = dense_grad(p.grad());
    at::Tensor w = s.master.defined() ? s.master : p;  // the fp32 weights being updated
    if (grad.scalar_type() != torch::kFloat32) grad = grad.to(torch::kFloat32);
    const double decay_mul = 1.0 - lr * s.weight_decay;
    bool fusable = fused && w.device().is_cpu() && w.is_contiguous() && grad.is_contiguous() &&
                   grad.device().is_cpu();
    if (fusable) {
      fused_adamw_cpu(w.data_ptr<float>(), grad.data_ptr<float>(), s.exp_avg.data_ptr<float>(),
                      s.exp_avg_sq.data_ptr<float>(), w.numel(), static_cast<float>(decay_mul),
                      static_cast<float>(1.0 - b1), static_cast<float>(b2), static_cast<float>(1.0 - b2),
                      static_cast<float>(bc2_sqrt), static_cast<float>(opt_.eps), static_cast<float>(-step_size));
    } else {
      if (s.weight_decay != 0.0) w.mul_(decay_mul);
      s.exp_avg.lerp_(grad, 1.0 - b1);
      s.exp_avg_sq.mul_(b2).addcmul_(grad, grad, 1.0 - b2);
      at::Tensor denom = (s.exp_avg_sq.sqrt() / bc2_sqrt).add_(opt_.eps);
      w.addcdiv_(s.exp_avg, denom, -step_size);
    }
    if (s.master.defined()) p.copy_(s.master);
  }
}

NamedTensors AdamW::state() const {
  NamedTensors out;
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& name = params_[i].first;
    out.emplace_back("exp_avg." + name, slots_[i].exp_avg);
    out.emplace_back("exp_avg_sq." + name, slots_[i].exp_avg_sq);
    if (slots_[i].master.defined()) out.emplace_back("master." + name, slots_[i].master);
  }
  return out;
}

void AdamW::load_state(const NamedTensors& tensors, int64_t step) {
  torch::NoGradGuard ng;
  std::unordered_map<std::string, const at::Tensor*> by_name;
  for (auto& [n, t] : tensors) by_name[n] = &t;
  auto take = [&](const std::string& key, at::Tensor& dst) {
    auto it = by_name.find(key);
    if (it == by_name.end())
      throw Error("optimizer state has no tensor " + key +
                  "\n---> HINT: the checkpoint was written for another model or optimizer; resume=never starts fresh");
    const at::Tensor& src = *it->second;
    if (src.sizes() != dst.sizes())
      throw Error("optimizer state " + key + " has shape " + c10::str(src.sizes()) + ", the model needs " +
                  c10::str(dst.sizes()));
    dst.copy_(src);
  };
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& name = params_[i].first;
    take("exp_avg." + name, slots_[i].exp_avg);
    take("exp_avg_sq." + name, slots_[i].exp_avg_sq);
    if (slots_[i].master.defined()) {
      take("master." + name, slots_[i].master);
      params_[i].second.detach().copy_(slots_[i].master);
    }
  }
  step_ = step;
}

}  // namespace ptk::optim
