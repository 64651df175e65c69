#include "reward/rm_loss.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>

#include "core/util/error.h"  // PTK_CHECK

namespace ptk::reward {

RmLossOutput rm_loss(const at::Tensor& chosen, const at::Tensor& rejected, const at::Tensor& margin,
                     const RmLossOptions& options) {
  PTK_CHECK(chosen.defined() && chosen.dim() == 1 && rejected.defined() && rejected.sizes() == chosen.sizes(),
            "rm_loss: chosen and rejected scores must both be (P)");
  if (margin.defined())
    PTK_CHECK(margin.sizes() == chosen.sizes(),
              "rm_loss: margin must be (P) = " + c10::str(chosen.sizes()) + ", got " + c10::str(margin.sizes()));
  const auto& c = options.center_rewards_coefficient;
  PTK_CHECK(!c || *c >= 0, "rm_loss: center_rewards_coefficient = " + c10::str(*c) + " must be >= 0 (or unset)");
  at::Tensor diff = chosen - rejected;  // (P)
  if (margin.defined()) diff = diff - margin.to(diff.scalar_type()).detach();
  at::Tensor bt = torch::nn::functional::softplus(-diff).mean();  // −logσ(x) = softplus(−x)
  at::Tensor center = c ? *c * (chosen + rejected).pow(2).mean() : torch::zeros({}, bt.options());
  RmLossOutput out;
  out.loss = bt + center;
  out.bt_loss = bt.detach();
  out.center_term = center.detach();
  return out;
}

RmMetricSums rm_metric_sums(const at::Tensor& chosen, const at::Tensor& rejected) {
  PTK_CHECK(chosen.dim() == 1 && rejected.sizes() == chosen.sizes() && chosen.numel() > 0,
            "rm_metric_sums: chosen and rejected scores must both be (P), P > 0");
  torch::NoGradGuard no_grad;
  at::Tensor rc = chosen.detach().to(torch::kFloat64), rr = rejected.detach().to(torch::kFloat64);
  at::Tensor all = at::cat({rc, rr});
  RmMetricSums s;
  s.reward_min = all.min().item<double>();
  s.reward_max = all.max().item<double>();
  s.reward_sum = all.sum().item<double>();
  s.reward_count = static_cast<double>(all.numel());
  s.accuracy = rc.gt(rr).to(torch::kFloat64).mean().item<double>();
  s.margin = (rc - rr).mean().item<double>();
  s.processes = 1;
  return s;
}

void merge(RmMetricSums& a, const RmMetricSums& b) {
  if (b.reward_count == 0) return;
  if (a.reward_count == 0) {
    a = b;
    return;
  }
  a.reward_min = std::min(a.reward_min, b.reward_min);
  a.reward_max = std::max(a.reward_max, b.reward_max);
  a.reward_sum += b.reward_sum;
  a.reward_count += b.reward_count;
  a.accuracy += b.accuracy;
  a.margin += b.margin;
  a.processes += b.processes;
}

std::vector<std::pair<std::string, double>> rm_metrics(const RmMetricSums& s) {
  const double nan = std::nan("");
  if (s.reward_count == 0) return {{"min_reward", nan}, {"mean_reward", nan}, {"max_reward", nan}, {"accuracy", nan}, {"margin", nan}};
  return {{"min_reward", s.reward_min},
          {"mean_reward", s.reward_sum / s.reward_count},
          {"max_reward", s.reward_max},
          {"accuracy", s.accuracy / s.processes},
          {"margin", s.margin / s.processes}};
}

}  // namespace ptk::reward
