// DPO and SimPO/CPO losses and metrics against docs/FORMULAS.md section 2's worked example (β = 0.1,
// 2 pairs), plus LD-DPO sums, the vocab-mean logits shortcut, validation and gradients.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "core/util/error.h"
#include "rl/dpo_loss.h"

namespace ptk::rl {
namespace {

// Tolerance for a number quoted to 6 significant digits.
double sig6(double e) { return 5e-6 * std::max(std::abs(e), 1e-3); }

at::Tensor t64(std::vector<double> v) { return torch::tensor(v, torch::kFloat64); }

double metric(const NamedValues& v, const std::string& name) {
  for (auto& [n, x] : v)
    if (n == name) return x;
  ADD_FAILURE() << "no metric " << name;
  return std::nan("");
}

// Rows: chosen 1, chosen 2, rejected 1, rejected 2; padding is 99 (must be masked out).
struct Example {
  at::Tensor policy = t64({-0.5, -1.0, -0.3, 99, -2.0, -0.4, -0.6, -1.0, -1.2, -0.8, 99, 99, -0.9, -1.1, -0.2, 99})
                          .view({4, 4});
  at::Tensor ref = t64({-0.6, -1.1, -0.6, 99, -1.5, -0.5, -0.7, -0.9, -1.0, -0.7, 99, 99, -1.0, -0.9, -0.4, 99})
                       .view({4, 4});
  at::Tensor mask = torch::tensor({1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0}, torch::kInt64).view({4, 4});

  DpoPairLogps pairs(bool grad = false) {
    at::Tensor s = dpo_sequence_logps(policy, mask), s_ref = dpo_sequence_logps(ref, mask);
    at::Tensor n = mask.sum(1);
    DpoPairLogps p;
    p.policy_chosen = s.slice(0, 0, 2).clone().requires_grad_(grad);
    p.policy_rejected = s.slice(0, 2).clone().requires_grad_(grad);
    p.ref_chosen = s_ref.slice(0, 0, 2);
    p.ref_rejected = s_ref.slice(0, 2);
    p.chosen_tokens = n.slice(0, 0, 2);
    p.rejected_tokens = n.slice(0, 2);
    return p;
  }
};

DpoLossOptions opts(std::vector<std::string> types, std::vector<double> weights = {}, double eps = 0.0) {
  DpoLossOptions o;
  o.loss_type = std::move(types);
  o.loss_weights = std::move(weights);
  o.beta = 0.1;
  o.label_smoothing = eps;
  return o;
}

TEST(DpoLoss, SequenceSums) {
  Example ex;
  // s_θ(y⁺) = (−1.8, −4), s_θ(y⁻) = (−2, −2.2); s_ref(y⁺) = (−2.3, −3.6), s_ref(y⁻) = (−1.7, −2.3).
  EXPECT_TRUE(torch::allclose(dpo_sequence_logps(ex.policy, ex.mask), t64({-1.8, -4, -2, -2.2})));
  EXPECT_TRUE(torch::allclose(dpo_sequence_logps(ex.ref, ex.mask), t64({-2.3, -3.6, -1.7, -2.3})));
}

TEST(DpoLoss, LdAlphaWeightsTheTailBeyondTheSharedLength) {
  Example ex;
  // α = 0.5. Pair 1: n⁺ = 3, n⁻ = 2 → shared 2: chosen −0.5 − 1.0 + 0.5·(−0.3) = −1.65, rejected
  // −2 (no tail). Pair 2: n⁺ = 4, n⁻ = 3: chosen −2.0 − 0.4 − 0.6 + 0.5·(−1.0) = −3.5, rejected −2.2.
  EXPECT_TRUE(torch::allclose(dpo_sequence_logps(ex.policy, ex.mask, 0.5), t64({-1.65, -3.5, -2, -2.2})));
  // α = 1 is the plain sum.
  EXPECT_TRUE(torch::allclose(dpo_sequence_logps(ex.policy, ex.mask, 1.0), dpo_sequence_logps(ex.policy, ex.mask)));
}

TEST(DpoLoss, EveryLossTypeMatchesFormulas) {
  Example ex;
  auto p = ex.pairs();
  // ρ⁺ = (0.5, −0.4), ρ⁻ = (−0.3, 0.1), Δ = (0.8, −0.5), n⁺ = (3, 4), n⁻ = (2, 3), Δ̄ = (0.316667, −0.133333).
  struct Case {
    const char* type;
    double eps, pair0, pair1, loss;
  };
  const Case cases[] = {
      // sigmoid: −logσ(0.08) = 0.653947, −logσ(−0.05) = 0.71846.
      {"sigmoid", 0, 0.653947, 0.71846, 0.686203},
      // hinge: max(0, 1 − βΔ) = 0.92, 1.05.
      {"hinge", 0, 0.92, 1.05, 0.985},
      // ipo: (Δ̄ − 1/(2β))² = (0.316667 − 5)² = 21.9336, (−0.133333 − 5)² = 26.3511.
      {"ipo", 0, 21.9336, 26.3511, 24.1424},
      // robust ε = 0.1: (0.9·0.653947 − 0.1·0.733947)/0.8 = 0.643947.
      {"robust", 0.1, 0.643947, 0.72471, 0.684328},
      // sft: (1.8 + 4)/(3 + 4) = 0.828571, the same for both pairs.
      {"sft", 0, 0.828571, 0.828571, 0.828571},
      // sigmoid_norm: −logσ(0.1·0.316667) = 0.677439.
      {"sigmoid_norm", 0, 0.677439, 0.699836, 0.688638},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.type);
    auto out = dpo_loss(p, opts({c.type}, {}, c.eps));
    EXPECT_NEAR(out.per_pair[0][0].item<double>(), c.pair0, sig6(c.pair0));
    EXPECT_NEAR(out.per_pair[0][1].item<double>(), c.pair1, sig6(c.pair1));
    EXPECT_NEAR(out.loss.item<double>(), c.loss, sig6(c.loss));
  }
  // ["sigmoid", "sft"] with weights [1.0, 0.5]: 0.686203 + 0.5·0.828571 = 1.10049.
  auto combo = dpo_loss(p, opts({"sigmoid", "sft"}, {1.0, 0.5}));
  EXPECT_NEAR(combo.loss.item<double>(), 1.10049, sig6(1.10049));
  ASSERT_EQ(combo.per_pair.size(), 2u);
  // label_smoothing does not touch sigmoid (TRL dropped cDPO; the old form would give 0.687703).
  EXPECT_NEAR(dpo_loss(p, opts({"sigmoid"}, {}, 0.1)).loss.item<double>(), 0.686203, sig6(0.686203));
}

// LD-DPO: the preference terms take the mixed sums (the stage mixes the reference's too), the sft
// term the plain ones (TRL: a token mean of the per-token log-probs), found by
// tests/reference/dpo_reference_test.py.
TEST(DpoLoss, SftTermIgnoresTheLdDpoMix) {
  Example e;
  DpoPairLogps p = e.pairs();
  DpoPairLogps ld = p;
  at::Tensor mixed = dpo_sequence_logps(e.policy, e.mask, 0.5);  // chosen (3, 4 tokens) vs rejected (2, 3)
  ld.policy_chosen = mixed.slice(0, 0, 2);
  ld.policy_rejected = mixed.slice(0, 2);
  ld.policy_chosen_plain = p.policy_chosen;
  EXPECT_NEAR(dpo_loss(ld, opts({"sft"})).loss.item<double>(), 0.828571, sig6(0.828571));
  // Without the plain sums the mixed ones stand in: pair 1 loses half its last token (−0.15), pair 2
  // half its 4th (−0.5): (1.65 + 3.5)/7 = 0.735714.
  ld.policy_chosen_plain = at::Tensor();
  EXPECT_NEAR(dpo_loss(ld, opts({"sft"})).loss.item<double>(), 0.735714, sig6(0.735714));
}

TEST(DpoLoss, Metrics) {
  Example ex;
  auto p = ex.pairs();
  auto out = dpo_loss(p, opts({"sigmoid"}));
  PairMetricSums s = pair_metric_sums(out.chosen_rewards, out.rejected_rewards, p.policy_chosen, p.policy_rejected);
  // Vocab-mean logits at the chosen targets (0.10, −0.20, 0.30 | 0.05, 0.00, −0.10, 0.20): 0.35 / 7 = 0.05;
  // rejected (0.40, −0.30 | 0.10, 0.20, 0.00): 0.4 / 5 = 0.08.
  s.logits_chosen = 0.35;
  s.logits_chosen_count = 7;
  s.logits_rejected = 0.4;
  s.logits_rejected_count = 5;
  auto m = pair_metrics(s);
  EXPECT_NEAR(metric(m, "rewards/chosen"), 0.005, 1e-9);     // (0.05 − 0.04)/2
  EXPECT_NEAR(metric(m, "rewards/rejected"), -0.01, 1e-9);   // (−0.03 + 0.01)/2
  EXPECT_NEAR(metric(m, "rewards/margins"), 0.015, 1e-9);
  EXPECT_NEAR(metric(m, "rewards/accuracies"), 0.5, 1e-12);  // pair 1 right, pair 2 wrong
  EXPECT_NEAR(metric(m, "logps/chosen"), -2.9, 1e-9);
  EXPECT_NEAR(metric(m, "logps/rejected"), -2.1, 1e-9);
  EXPECT_NEAR(metric(m, "logits/chosen"), 0.05, 1e-12);
  EXPECT_NEAR(metric(m, "logits/rejected"), 0.08, 1e-12);

  // Two processes holding one pair each merge to the same values.
  auto a = pair_metric_sums(out.chosen_rewards.slice(0, 0, 1), out.rejected_rewards.slice(0, 0, 1),
                            p.policy_chosen.slice(0, 0, 1), p.policy_rejected.slice(0, 0, 1));
  auto b = pair_metric_sums(out.chosen_rewards.slice(0, 1), out.rejected_rewards.slice(0, 1),
                            p.policy_chosen.slice(0, 1), p.policy_rejected.slice(0, 1));
  merge(a, b);
  EXPECT_NEAR(metric(pair_metrics(a), "rewards/margins"), 0.015, 1e-9);

  // Ties count as wrong.
  auto tie = pair_metric_sums(t64({0.1}), t64({0.1}), t64({-1}), t64({-1}));
  EXPECT_EQ(metric(pair_metrics(tie), "rewards/accuracies"), 0.0);
}

TEST(DpoLoss, VocabMeanLogitsEqualsTheFullLogitsMean) {
  torch::manual_seed(0);
  auto h = torch::randn({5, 8}), w = torch::randn({11, 8});
  auto full = h.matmul(w.t()).mean(1);  // (5): mean over V of the raw logits
  EXPECT_TRUE(torch::allclose(dpo_vocab_mean_logits(h, w), full, 1e-5, 1e-6));
}

TEST(DpoLoss, SimPOThroughTheCpoTrainer) {
  Example ex;
  auto p = ex.pairs();
  CpoPairLogps c{p.policy_chosen, p.policy_rejected, p.chosen_tokens, p.rejected_tokens};
  CpoLossOptions o;
  o.loss_type = "simpo";
  o.beta = 2.0;
  o.simpo_gamma = 0.5;
  o.cpo_alpha = 0.0;
  auto out = cpo_loss(c, o);
  // a⁺ = (−1.8/3, −4/4) = (−0.6, −1), a⁻ = (−2/2, −2.2/3) = (−1, −0.733333).
  EXPECT_TRUE(torch::allclose(out.chosen_scores, t64({-0.6, -1.0})));
  EXPECT_NEAR(out.rejected_scores[1].item<double>(), -0.733333, sig6(-0.733333));
  // −logσ(β(a⁺ − a⁻) − γ): −logσ(0.8 − 0.5) = 0.554355, −logσ(−0.533333 − 0.5) = 1.33774.
  EXPECT_NEAR(out.per_pair[0].item<double>(), 0.554355, sig6(0.554355));
  EXPECT_NEAR(out.per_pair[1].item<double>(), 1.33774, sig6(1.33774));
  EXPECT_NEAR(out.loss.item<double>(), 0.946047, sig6(0.946047));
  auto m = pair_metrics(pair_metric_sums(out.chosen_rewards, out.rejected_rewards, out.chosen_scores, out.rejected_scores));
  EXPECT_NEAR(metric(m, "rewards/chosen"), -1.6, 1e-9);        // 2·(−0.6 − 1)/2
  EXPECT_NEAR(metric(m, "rewards/rejected"), -1.73333, sig6(-1.73333));  // 2·(−1 − 0.733333)/2
  EXPECT_NEAR(metric(m, "rewards/accuracies"), 0.5, 1e-12);
  EXPECT_NEAR(metric(m, "logps/chosen"), -0.8, 1e-9);
  // cpo_alpha = 1 adds the chosen NLL 5.8/7 = 0.828571: 1.77462.
  o.cpo_alpha = 1.0;
  auto out1 = cpo_loss(c, o);
  EXPECT_NEAR(out1.nll.item<double>(), 0.828571, sig6(0.828571));
  EXPECT_NEAR(out1.loss.item<double>(), 1.77462, sig6(1.77462));
  // CPO sigmoid uses sums: −logσ(0.1·(−1.8 + 2)) and −logσ(0.1·(−4 + 2.2)).
  o.loss_type = "sigmoid";
  o.beta = 0.1;
  o.cpo_alpha = 0.0;
  auto sig = cpo_loss(c, o);
  EXPECT_NEAR(sig.per_pair[0].item<double>(), std::log1p(std::exp(-0.02)), 1e-12);
  EXPECT_NEAR(sig.per_pair[1].item<double>(), std::log1p(std::exp(0.18)), 1e-12);
}

TEST(DpoLoss, SigmoidGradient) {
  Example ex;
  auto p = ex.pairs(/*grad=*/true);
  dpo_loss(p, opts({"sigmoid"})).loss.backward();
  // d/ds_θ(y⁺_i) of mean_i −logσ(βΔ_i) = −β σ(−βΔ_i) / P; the rejected gradient is its negative.
  for (int i = 0; i < 2; ++i) {
    const double bd = i == 0 ? 0.08 : -0.05;
    const double g = -0.1 / (1 + std::exp(bd)) / 2;
    EXPECT_NEAR(p.policy_chosen.grad()[i].item<double>(), g, 1e-12);
    EXPECT_NEAR(p.policy_rejected.grad()[i].item<double>(), -g, 1e-12);
  }
  // sft: d/ds_θ(y⁺_i) = −1/Σn⁺ = −1/7 for every pair; no gradient on the rejected side.
  auto q = ex.pairs(true);
  dpo_loss(q, opts({"sft"})).loss.backward();
  EXPECT_NEAR(q.policy_chosen.grad()[0].item<double>(), -1.0 / 7, 1e-12);
  EXPECT_FALSE(q.policy_rejected.grad().defined() && q.policy_rejected.grad().abs().sum().item<double>() != 0);
}

TEST(DpoLoss, ValidationListsEveryProblem) {
  Example ex;
  auto p = ex.pairs();
  DpoLossOptions o = opts({"sigmod", "ipo"}, {1.0});
  o.label_smoothing = 0.5;
  auto errors = dpo_validate(o);
  ASSERT_EQ(errors.size(), 3u);
  EXPECT_NE(errors[0].find("sigmoid, hinge, ipo, robust, sft, sigmoid_norm"), std::string::npos) << errors[0];
  EXPECT_NE(errors[0].find("did you mean 'sigmoid'"), std::string::npos) << errors[0];
  EXPECT_THROW(dpo_loss(p, o), Error);
  EXPECT_THROW(cpo_loss_type_from_name("orpo"), Error);
  EXPECT_EQ(dpo_loss_type_from_name("sigmoid_norm"), DpoLossType::kSigmoidNorm);
  EXPECT_STREQ(dpo_loss_type_name(DpoLossType::kRobust), "robust");
}

}  // namespace
}  // namespace ptk::rl
