// SFT loss terms against docs/FORMULAS.md section 1's worked example (vocab 3, two micro-batches, N = 7).
// The example gives logit rows; with an identity lm_head (V = H = 3) the hidden states are the logits.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "sft/sft_loss.h"

namespace ptk::sft {
namespace {

// Puts `rows[k]` at hidden position `pos[k]` of row `b[k]`; other positions get arbitrary values
// (they score no target and must not matter).
at::Tensor hidden_with(int64_t B, int64_t T, const std::vector<std::tuple<int, int, std::vector<float>>>& rows) {
  auto h = torch::randn({B, T, 3}) * 5;
  for (auto& [b, t, v] : rows) h[b][t] = torch::tensor(v);
  return h;
}

TEST(SftLoss, FormulasWorkedExample) {
  auto eye = torch::eye(3);
  // Micro-batch A: A1 labels [-100,-100,1,2] (rows 1, 2 score targets 1, 2); A2 labels [-100,2,-100,-100].
  auto labels_a = torch::tensor({-100, -100, 1, 2, -100, 2, -100, -100}, torch::kInt64).view({2, 4});
  auto ha = hidden_with(2, 4, {{0, 1, {0.5f, 2.0f, -1.0f}}, {0, 2, {0.1f, 0.3f, 0.2f}}, {1, 0, {1.0f, 0.0f, 0.5f}}});
  // Micro-batch B: B1 labels [-100,1,1,2,0].
  auto labels_b = torch::tensor({-100, 1, 1, 2, 0}, torch::kInt64).view({1, 5});
  auto hb = hidden_with(1, 5,
                        {{0, 0, {0.0f, 1.5f, 0.5f}},
                         {0, 1, {0.2f, 0.2f, 1.2f}},
                         {0, 2, {-1.0f, 0.0f, 3.0f}},
                         {0, 3, {0.3f, 0.1f, 0.0f}}});
  EXPECT_EQ(count_targets(labels_a) + count_targets(labels_b), 7);
  auto a = sft_terms(ha, eye, labels_a), b = sft_terms(hb, eye, labels_b);
  const double n = 7;
  // By hand: nll A = (0.241311, 1.10194, 1.18027) -> L_A = 2.52352 / 7 = 0.360503.
  EXPECT_NEAR(a.nll_sum.item<double>() / n, 0.360503, 1e-6);
  EXPECT_NEAR(b.nll_sum.item<double>() / n, 0.431647, 1e-6);
  EXPECT_NEAR((a.nll_sum + b.nll_sum).item<double>() / n, 0.79215, 1e-5);
  // Metrics are per micro-batch means, logged as their mean.
  EXPECT_NEAR(static_cast<double>(a.correct) / a.targets, 0.333333, 1e-6);
  EXPECT_NEAR(static_cast<double>(b.correct) / b.targets, 0.75, 1e-6);
  EXPECT_NEAR(a.entropy_sum / a.targets, 0.912354, 1e-6);
  EXPECT_NEAR(b.entropy_sum / b.targets, 0.811559, 1e-6);
}

TEST(SftLoss, GradientOnlyFromTargets) {
  auto labels = torch::tensor({-100, 1, -100}, torch::kInt64).view({1, 3});
  auto h = torch::randn({1, 3, 3}).requires_grad_(true);
  sft_terms(h, torch::eye(3), labels).nll_sum.backward();
  EXPECT_GT(h.grad()[0][0].abs().sum().item<double>(), 0);   // position 0 predicts label 1
  EXPECT_EQ(h.grad()[0][1].abs().sum().item<double>(), 0);   // predicts an ignored label
  EXPECT_EQ(h.grad()[0][2].abs().sum().item<double>(), 0);   // last position predicts nothing
}

TEST(SftLoss, NoTargets) {
  auto labels = torch::full({2, 4}, -100, torch::kInt64);
  auto h = torch::randn({2, 4, 3}).requires_grad_(true);
  auto t = sft_terms(h, torch::eye(3), labels);
  EXPECT_EQ(t.targets, 0);
  EXPECT_EQ(t.nll_sum.item<double>(), 0.0);
  t.nll_sum.backward();  // still differentiable
}

}  // namespace
}  // namespace ptk::sft
