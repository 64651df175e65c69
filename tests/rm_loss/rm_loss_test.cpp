// Reward-model loss and metrics against docs/FORMULAS.md section 3's worked example (3 pairs, P = 1):
// r⁺ = (1.5, 0.2, −0.4), r⁻ = (0.3, 0.9, −0.4), m = (0.5, 0, 1), c = 0.01.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "reward/rm_loss.h"

namespace ptk::reward {
namespace {

at::Tensor t64(std::vector<double> v) { return torch::tensor(v, torch::kFloat64); }

double metric(const std::vector<std::pair<std::string, double>>& v, const std::string& name) {
  for (auto& [n, x] : v)
    if (n == name) return x;
  ADD_FAILURE() << "no metric " << name;
  return std::nan("");
}

const at::Tensor kChosen = t64({1.5, 0.2, -0.4}), kRejected = t64({0.3, 0.9, -0.4}), kMargin = t64({0.5, 0, 1});

TEST(RmLoss, FormulasWorkedExample) {
  RmLossOptions none, centered;
  centered.center_rewards_coefficient = 0.01;
  // No margin: mean(softplus(−1.2), softplus(0.7), softplus(0)) = (0.263282 + 1.103186 + 0.693147)/3 = 0.686539.
  EXPECT_NEAR(rm_loss(kChosen, kRejected, {}, none).loss.item<double>(), 0.686539, 1e-6);
  // Margin: differences 0.7, −0.7, −1: (0.403186 + 1.103186 + 1.313262)/3 = 0.939878.
  EXPECT_NEAR(rm_loss(kChosen, kRejected, kMargin, none).loss.item<double>(), 0.939878, 1e-6);
  // Centering: 0.01·(1.8² + 1.1² + 0.8²)/3 = 0.01·5.09/3 = 0.0169667.
  auto c = rm_loss(kChosen, kRejected, kMargin, centered);
  EXPECT_NEAR(c.center_term.item<double>(), 0.0169667, 1e-7);
  EXPECT_NEAR(c.loss.item<double>(), 0.956845, 1e-6);
  EXPECT_NEAR(rm_loss(kChosen, kRejected, {}, centered).loss.item<double>(), 0.703505, 1e-6);
  EXPECT_EQ(rm_loss(kChosen, kRejected, {}, none).center_term.item<double>(), 0.0);
}

TEST(RmLoss, Metrics) {
  auto m = rm_metrics(rm_metric_sums(kChosen, kRejected));
  EXPECT_NEAR(metric(m, "accuracy"), 1.0 / 3, 1e-12);  // the tie (−0.4, −0.4) counts as wrong
  EXPECT_NEAR(metric(m, "margin"), 0.166667, 1e-6);    // (1.2 − 0.7 + 0)/3, dataset margin not subtracted
  EXPECT_NEAR(metric(m, "min_reward"), -0.4, 1e-12);
  EXPECT_NEAR(metric(m, "mean_reward"), 0.35, 1e-12);  // 2.1 / 6
  EXPECT_NEAR(metric(m, "max_reward"), 1.5, 1e-12);
  // Two processes: accuracy and margin are means of per-process means, min/mean/max over all scores.
  auto a = rm_metric_sums(kChosen.slice(0, 0, 1), kRejected.slice(0, 0, 1));  // acc 1, margin 1.2
  auto b = rm_metric_sums(kChosen.slice(0, 1), kRejected.slice(0, 1));        // acc 0, margin −0.35
  merge(a, b);
  auto g = rm_metrics(a);
  EXPECT_NEAR(metric(g, "accuracy"), 0.5, 1e-12);
  EXPECT_NEAR(metric(g, "margin"), (1.2 - 0.35) / 2, 1e-12);
  EXPECT_NEAR(metric(g, "mean_reward"), 0.35, 1e-12);
  EXPECT_NEAR(metric(g, "min_reward"), -0.4, 1e-12);
}

TEST(RmLoss, Gradient) {
  auto rc = kChosen.clone().requires_grad_(true), rr = kRejected.clone().requires_grad_(true);
  RmLossOptions o;
  o.center_rewards_coefficient = 0.01;
  rm_loss(rc, rr, kMargin, o).loss.backward();
  // d/dr⁺_i = −σ(−(r⁺ − r⁻ − m))/P + 2c(r⁺ + r⁻)/P; pair 1: −σ(−0.7)/3 + 0.02·1.8/3.
  const double g0 = -1.0 / (1 + std::exp(0.7)) / 3 + 0.02 * 1.8 / 3;
  EXPECT_NEAR(rc.grad()[0].item<double>(), g0, 1e-12);
  EXPECT_NEAR(rr.grad()[0].item<double>(), 1.0 / (1 + std::exp(0.7)) / 3 + 0.02 * 1.8 / 3, 1e-12);
}

}  // namespace
}  // namespace ptk::reward
