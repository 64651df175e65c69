// GRPO rewards, advantages, importance weights, per-token objective, aggregation and metrics against
// docs/FORMULAS.md section 4.8's worked example (2 prompts × G = 3, max_completion_length 4, β = 0.04,
// ε = 0.2 / 0.28, reward weights (1, 0.5)), plus gradient checks for the subtle cases.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "core/util/error.h"
#include "rl/grpo_loss.h"

namespace ptk::rl {
namespace {

const double kNaN = std::nan("");

at::Tensor t64(std::vector<double> v) { return torch::tensor(v, torch::kFloat64); }

double metric(const NamedValues& v, const std::string& name) {
  for (auto& [n, x] : v)
    if (n == name) return x;
  ADD_FAILURE() << "no metric " << name;
  return kNaN;
}

// The example's rows, padded to T = 4 with 0 (masked).
at::Tensor rows(std::vector<std::vector<double>> r) {
  auto out = torch::zeros({6, 4}, torch::kFloat64);
  for (size_t i = 0; i < r.size(); ++i)
    for (size_t t = 0; t < r[i].size(); ++t) out[i][t] = r[i][t];
  return out;
}

struct Example {
  at::Tensor mask = rows({{1, 1, 1}, {1, 1, 1, 1}, {1, 1}, {1, 1, 1, 1}, {1}, {1, 1, 1}});
  at::Tensor logps = rows({{-1.0, -0.5, -2.0}, {-0.3, -1.2, -0.7, -0.9}, {-2.5, -0.1}, {-0.6, -0.8, -1.5, -0.2},
                           {-1.1}, {-0.4, -0.9, -1.3}});
  at::Tensor lambda = rows({{0.10, -0.30, 0.40}, {0.05, 0.20, -0.25, 0.30}, {-0.40, 0.15}, {0.30, -0.10, 0.00, -0.35},
                            {0.50}, {0.00, 0.10, -0.20}});
  at::Tensor ref_minus = rows({{0.20, -0.10, 0.30}, {0.00, 0.50, -0.20, 0.10}, {0.40, 0.00}, {-0.30, 0.20, 0.10, 0.00},
                               {0.60}, {0.10, 0.00, -0.10}});
  at::Tensor entropy = rows({{1.2, 0.4, 2.0}, {0.8, 1.5, 0.3, 0.9}, {2.5, 0.6}, {0.7, 1.1, 1.9, 0.2}, {1.0},
                             {0.5, 0.9, 1.3}});
  at::Tensor old_minus_sampler = rows({{0.05, 0.02, -0.03}, {0.00, 0.10, 0.05, -0.05}, {0.20, 0.10},
                                       {0.50, 0.40, 0.30, 0.20}, {-0.10}, {0.02, 0.00, 0.01}});
  // f1, f2 per completion; NaN = None.
  at::Tensor rewards = t64({1, 0.5, 0, kNaN, 0, 1.0, 1, 0.0, 1, 0.5, kNaN, kNaN}).view({6, 2});

  at::Tensor old_logps() const { return logps - lambda; }
  at::Tensor ref_logps() const { return logps + ref_minus; }
  at::Tensor sampler_logps() const { return old_logps() - old_minus_sampler; }

  GrpoAdvantages advantages(const std::string& scale = "group", const std::string& agg = "sum_then_normalize") const {
    GrpoAdvantageOptions o;
    o.num_generations = 3;
    o.reward_weights = {1.0, 0.5};
    o.scale_rewards = scale;
    o.multi_objective_aggregation = agg;
    return grpo_advantages(rewards, o, {"f1", "f2"});
  }

  GrpoMicroBatch batch(int64_t begin = 0, int64_t end = 6) const {
    GrpoMicroBatch b;
    b.logps = logps.slice(0, begin, end);
    b.old_logps = old_logps().slice(0, begin, end);
    b.ref_logps = ref_logps().slice(0, begin, end);
    b.entropy = entropy.slice(0, begin, end);
    b.mask = mask.slice(0, begin, end);
    b.advantages = advantages().advantages.slice(0, begin, end);
    return b;
  }
};

GrpoLossOptions options(const std::string& loss_type, double beta = 0.04) {
  GrpoLossOptions o;
  o.loss_type = loss_type;
  o.beta = beta;
  o.epsilon = 0.2;
  o.epsilon_high = 0.28;
  o.max_completion_length = 4;
  return o;
}

GrpoScaling scaling(int64_t K = 1, double N = 17) {
  GrpoScaling s;
  s.accumulation_steps = K;
  s.num_processes = 1;
  s.num_items_in_batch = N;
  return s;
}

// Tolerance for a number quoted to 6 significant digits.
double sig6(double e) { return 5e-6 * std::max(std::abs(e), 1e-3); }

double loss_of(const GrpoMicroBatch& b, const GrpoLossOptions& o, const GrpoScaling& s) {
  return grpo_loss(b, o, s).loss.item<double>();
}

TEST(GrpoAdvantages, RewardsAndAllFourModes) {
  Example ex;
  auto g = ex.advantages("group");
  // R = (1.25, 0, 0.5, 1, 1.25, NaN): completion 2's None term is skipped, 6 is unscorable.
  EXPECT_TRUE(torch::allclose(g.rewards.slice(0, 0, 5), t64({1.25, 0, 0.5, 1, 1.25})));
  EXPECT_TRUE(std::isnan(g.rewards[5].item<double>()));
  // Group stds 0.629153 (n = 3) and 0.176777 (n = 2): A = (R − μ)/(std + 1e-4), unscorable → 0.
  EXPECT_NEAR(g.scale_std[0].item<double>(), 0.629153, 1e-6);
  EXPECT_NEAR(g.scale_std[3].item<double>(), 0.176777, 1e-6);
  auto near = [](const at::Tensor& a, std::vector<double> e) {
    for (size_t i = 0; i < e.size(); ++i) EXPECT_NEAR(a[i].item<double>(), e[i], sig6(e[i])) << i;
  };
  near(g.advantages, {1.05946, -0.927025, -0.132432, -0.706707, 0.706707, 0});
  near(ex.advantages("batch").advantages, {1.22981, -1.07609, -0.153727, -0.23059, 0.23059, 0});
  near(ex.advantages("none").advantages, {0.666667, -0.583333, -0.0833333, -0.125, 0.125, 0});
  near(ex.advantages("group", "normalize_then_sum").advantages, {1.41868, -1.02233, -0.396351, -0.625976, 0.625976, 0});
  // Metrics over the raw weighted rewards.
  EXPECT_NEAR(metric(g.metrics, "reward"), 0.8, 1e-12);
  EXPECT_NEAR(metric(g.metrics, "reward_std"), 0.541987, 1e-6);
  EXPECT_NEAR(metric(g.metrics, "rewards/f1/mean"), 0.6, 1e-12);
  EXPECT_NEAR(metric(g.metrics, "rewards/f1/std"), 0.547723, 1e-6);
  EXPECT_NEAR(metric(g.metrics, "rewards/f2/mean"), 0.5, 1e-12);
  EXPECT_NEAR(metric(g.metrics, "rewards/f2/std"), 0.408248, 1e-6);
  EXPECT_EQ(metric(g.metrics, "frac_reward_zero_std"), 0.0);
  EXPECT_NEAR(ex.advantages("batch").scale_std[0].item<double>(), 0.541987, 1e-6);
}

TEST(GrpoAdvantages, ZeroStdGroupsAndLoneMembers) {
  // Group 1 all equal (std 0 → A 0, counted in frac_reward_zero_std); group 2 has one scored member
  // (std NaN → A NaN → 0, not counted as zero std).
  GrpoAdvantageOptions o;
  o.num_generations = 2;
  auto a = grpo_advantages(t64({0.7, 0.7, 1.0, kNaN}).view({4, 1}), o);
  EXPECT_TRUE(torch::equal(a.advantages, t64({0, 0, 0, 0})));
  EXPECT_EQ(metric(a.metrics, "frac_reward_zero_std"), 0.5);
  o.scale_rewards = "grouped";
  try {
    grpo_advantages(t64({1, 2}).view({2, 1}), o);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("group, batch, none"), std::string::npos) << e.what();
  }
}

TEST(GrpoLoss, PerTokenObjectiveRowByRow) {
  // grpo on a one-row micro-batch is that row's mean of p + βKL, so each row checks its ratios
  // r = e^λ, clipping and k3 KL against the example's table (p + βKL by row).
  Example ex;
  const std::vector<std::vector<double>> p_kl = {{-1.17003, -0.784672, -1.35411},
                                                 {0.974555, 1.13822, 0.742369, 1.25156},
                                                 {0.109619, 0.153864},
                                                 {0.955587, 0.640311, 0.706914, 0.565366},
                                                 {-0.8957},
                                                 {0.000206837, 0, 0.000193497}};
  for (int i = 0; i < 6; ++i) {
    double mean = 0;
    for (double v : p_kl[i]) mean += v / p_kl[i].size();
    EXPECT_NEAR(loss_of(ex.batch(i, i + 1), options("grpo"), scaling()), mean, sig6(mean)) << "row " << i + 1;
  }
  // The KL alone (every advantage 0, β = 1): k3 at ℓ^ref − ℓ = 0.2 is e^0.2 − 0.2 − 1 = 0.0214028;
  // row 1's KL (0.0214028, 0.00483742, 0.0498588) has mean 0.0253663.
  auto b = ex.batch(0, 1);
  b.advantages = torch::zeros({1}, torch::kFloat64);
  EXPECT_NEAR(loss_of(b, options("grpo", 1.0), scaling()), (0.0214028 + 0.00483742 + 0.0498588) / 3, 1e-7);
}

TEST(GrpoLoss, EveryLossTypeOneAndTwoMicroBatches) {
  Example ex;
  struct Case {
    const char* type;
    double one, two;
  };
  const Case cases[] = {{"grpo", -0.0205068, -0.0205068},
                        {"bnpo", 0.178486, 0.18227},
                        {"dr_grpo", 0.126427, 0.126427},
                        {"dapo", 0.178486, 0.178486}};
  for (const auto& c : cases) {
    SCOPED_TRACE(c.type);
    EXPECT_NEAR(loss_of(ex.batch(), options(c.type), scaling(1)), c.one, sig6(c.one));
    // Rows 1–3 then 4–6 with K = 2: the micro-batch losses sum to the step loss.
    const double two = loss_of(ex.batch(0, 3), options(c.type), scaling(2)) +
                       loss_of(ex.batch(3, 6), options(c.type), scaling(2));
    EXPECT_NEAR(two, c.two, sig6(c.two));
  }
}

TEST(GrpoLoss, BetaZeroAndDelta) {
  Example ex;
  auto b = ex.batch();
  b.ref_logps = at::Tensor();  // β = 0 needs no reference
  EXPECT_NEAR(loss_of(b, options("dapo", 0.0), scaling()), 0.17698, sig6(0.17698));
  EXPECT_NEAR(loss_of(b, options("grpo", 0.0), scaling()), -0.0228851, sig6(-0.0228851));
  EXPECT_THROW(grpo_loss(b, options("dapo", 0.04), scaling()), Error);  // β > 0 without a reference
  auto o = options("dapo");
  o.delta = 1.3;
  EXPECT_NEAR(loss_of(ex.batch(), o, scaling()), 0.173694, sig6(0.173694));
}

TEST(GrpoLoss, Metrics) {
  Example ex;
  auto m = grpo_loss_metrics(grpo_loss(ex.batch(), options("dapo"), scaling()).metrics);
  EXPECT_NEAR(metric(m, "kl"), 0.0376509, 1e-6);
  EXPECT_NEAR(metric(m, "entropy"), 1.04706, sig6(1.04706));                   // 17.8 / 17
  EXPECT_NEAR(metric(m, "clip_ratio/low_mean"), 3.0 / 17, 1e-12);     // row 2 t3, row 3 t1, row 4 t4
  EXPECT_NEAR(metric(m, "clip_ratio/high_mean"), 2.0 / 17, 1e-12);    // row 1 t3, row 5 t1
  EXPECT_NEAR(metric(m, "clip_ratio/region_mean"), 5.0 / 17, 1e-12);
  EXPECT_EQ(metric(m, "clip_ratio/low_min"), 0.0);
  EXPECT_EQ(metric(m, "clip_ratio/high_max"), 1.0);
  // Two micro-batches merge to the same token-weighted means.
  auto a = grpo_loss(ex.batch(0, 3), options("dapo"), scaling()).metrics;
  merge(a, grpo_loss(ex.batch(3, 6), options("dapo"), scaling()).metrics);
  auto mm = grpo_loss_metrics(a);
  EXPECT_NEAR(metric(mm, "kl"), 0.0376509, 1e-6);
  EXPECT_NEAR(metric(mm, "clip_ratio/region_mean"), 5.0 / 17, 1e-12);
  EXPECT_EQ(metric(mm, "clip_ratio/high_max"), 1.0);
}

TEST(GrpoLoss, SequenceLevelGspo) {
  Example ex;
  auto o = options("dapo");
  o.importance_sampling_level = "sequence";
  // Sequence log-ratios (0.0666667, 0.075, −0.125, −0.0375, 0.5, −0.0333333).
  auto out = grpo_loss(ex.batch(), o, scaling());
  EXPECT_NEAR(out.loss.item<double>(), 0.157468, sig6(0.157468));
  auto m = grpo_loss_metrics(out.metrics);
  EXPECT_NEAR(metric(m, "clip_ratio/high_mean"), 1.0 / 6, 1e-12);  // row 5 only, each completion once
  EXPECT_EQ(metric(m, "clip_ratio/low_mean"), 0.0);
  o.loss_type = "grpo";
  EXPECT_NEAR(loss_of(ex.batch(), o, scaling()), -0.0376696, sig6(-0.0376696));
}

TEST(GrpoLoss, MaskTruncatedCompletions) {
  Example ex;
  // Ids: EOS = 2 ends every completion but row 2 (4 tokens, no EOS); pad = 0.
  auto ids = torch::tensor({7, 8, 2, 0, 7, 8, 9, 9, 7, 2, 0, 0, 7, 8, 9, 2, 2, 0, 0, 0, 7, 8, 2, 0}, torch::kInt64)
                 .view({6, 4});
  auto truncated = grpo_truncated_completions(ids, ex.mask, /*eos_id=*/2, /*pad_id=*/0);
  EXPECT_TRUE(torch::equal(truncated, torch::tensor({false, true, false, false, false, false})));
  auto b = ex.batch();
  b.mask = b.mask * truncated.logical_not().unsqueeze(1).to(torch::kFloat64);
  EXPECT_EQ(b.mask.sum().item<double>(), 13);  // N = 13; advantages unchanged
  EXPECT_NEAR(loss_of(b, options("dapo"), scaling(1, 13)), -0.082496, sig6(-0.082496));

  auto c = grpo_completion_metrics(ex.mask.sum(1), truncated);
  EXPECT_NEAR(metric(c, "completions/mean_length"), 17.0 / 6, 1e-12);
  EXPECT_EQ(metric(c, "completions/min_length"), 1);
  EXPECT_EQ(metric(c, "completions/max_length"), 4);
  EXPECT_NEAR(metric(c, "completions/clipped_ratio"), 1.0 / 6, 1e-12);
  EXPECT_NEAR(metric(c, "completions/mean_terminated_length"), 2.6, 1e-12);
  EXPECT_EQ(metric(c, "completions/min_terminated_length"), 1);
  EXPECT_EQ(metric(c, "completions/max_terminated_length"), 4);
}

TEST(GrpoLoss, TopEntropyQuantile) {
  Example ex;
  // ρ = 0.2: τ = quantile of the 17 active entropies at 0.8 = 1.3 + 0.8·(1.5 − 1.3) = 1.46.
  EXPECT_NEAR(grpo_entropy_threshold(ex.entropy.masked_select(ex.mask.ne(0)), 0.2), 1.46, 1e-6);
  // The device form (no host read) gives the same τ, and NaN (keep nothing) without active tokens.
  for (double rho : {0.2, 0.5, 0.9, 1.0})
    EXPECT_FLOAT_EQ(grpo_entropy_threshold_tensor(ex.entropy, ex.mask, rho).item<float>(),
                    static_cast<float>(grpo_entropy_threshold(ex.entropy.masked_select(ex.mask.ne(0)), rho)))
        << rho;
  EXPECT_TRUE(std::isnan(grpo_entropy_threshold_tensor(ex.entropy, torch::zeros_like(ex.mask), 0.2).item<float>()));
  auto o = options("dapo");
  o.top_entropy_quantile = 0.2;
  EXPECT_NEAR(loss_of(ex.batch(), o, scaling()), 0.0361424, sig6(0.0361424));
  // A gathered threshold overrides the local one: at τ = 0 every token is kept.
  auto b = ex.batch();
  b.entropy_threshold = 0.0;
  EXPECT_NEAR(loss_of(b, o, scaling()), 0.178486, sig6(0.178486));
}

TEST(GrpoLoss, ImportanceSamplingCorrection) {
  Example ex;
  GrpoImportanceOptions io;  // sequence_mask, C_max 3
  auto w = grpo_importance_weights(ex.old_logps(), ex.sampler_logps(), ex.mask, io);
  ASSERT_EQ(w.weights.sizes(), (std::vector<int64_t>{6, 1}));
  // w = e^{Σ_t d}: (1.04081, 1.10517, 1.34986, 4.0552 → 0, 0.904837, 1.03045).
  const double e[] = {1.04081, 1.10517, 1.34986, 0, 0.904837, 1.03045};
  for (int i = 0; i < 6; ++i) EXPECT_NEAR(w.weights[i][0].item<double>(), e[i], sig6(e[i])) << i;
  EXPECT_NEAR(metric(w.metrics, "sampling/sampling_logp_difference/mean"), 0.125294, 1e-6);
  EXPECT_NEAR(metric(w.metrics, "sampling/sampling_logp_difference/max"), 0.5, 1e-12);
  EXPECT_EQ(metric(w.metrics, "sampling/importance_sampling_ratio/min"), 0.0);
  EXPECT_NEAR(metric(w.metrics, "sampling/importance_sampling_ratio/max"), 1.34986, sig6(1.34986));
  auto b = ex.batch();
  b.is_weights = w.weights;
  EXPECT_NEAR(loss_of(b, options("dapo"), scaling()), 0.0377514, sig6(0.0377514));

  io.mode = "token_truncate";
  auto wt = grpo_importance_weights(ex.old_logps(), ex.sampler_logps(), ex.mask, io);
  ASSERT_EQ(wt.weights.sizes(), (std::vector<int64_t>{6, 4}));
  b.is_weights = wt.weights;
  EXPECT_NEAR(loss_of(b, options("dapo"), scaling()), 0.266236, sig6(0.266236));

  io.mode = "sequence_truncate";  // row 4 clamps to 3 instead of 0
  auto ws = grpo_importance_weights(ex.old_logps(), ex.sampler_logps(), ex.mask, io);
  EXPECT_NEAR(ws.weights[3][0].item<double>(), 3.0, 1e-12);
  io.mode = "token_mask";
  io.min = 1.0;  // every token with d < 0 is dropped
  auto wm = grpo_importance_weights(ex.old_logps(), ex.sampler_logps(), ex.mask, io);
  EXPECT_EQ(wm.weights[0][2].item<double>(), 0.0);             // d = −0.03
  EXPECT_NEAR(wm.weights[0][0].item<double>(), std::exp(0.05), 1e-12);
  io.mode = "sequence";
  EXPECT_THROW(grpo_importance_weights(ex.old_logps(), ex.sampler_logps(), ex.mask, io), Error);
}

TEST(GrpoLoss, CispoAndSapo) {
  Example ex;
  auto o = options("cispo");
  o.epsilon_high = 5.0;
  auto out = grpo_loss(ex.batch(), o, scaling());
  EXPECT_NEAR(out.loss.item<double>(), 0.0157672, sig6(0.0157672));
  EXPECT_EQ(metric(grpo_loss_metrics(out.metrics), "cispo_clip_ratio"), 0.0);  // no ratio above 5
  EXPECT_NEAR(loss_of(ex.batch(), options("sapo"), scaling()), -0.106595, sig6(-0.106595));
}

TEST(GrpoLoss, RatioOneStillGivesMinusAGradient) {
  // μ = 1: old log-probs are the detached current ones, r ≡ 1, yet ∂p/∂ℓ = −A r = −A.
  Example ex;
  auto b = ex.batch();
  b.old_logps = at::Tensor();
  b.ref_logps = at::Tensor();
  b.logps = ex.logps.clone().requires_grad_(true);
  auto out = grpo_loss(b, options("dapo", 0.0), scaling());
  // Loss value −Σ_i A_i |o_i| / N.
  auto A = b.advantages;
  const double expect = -(A * ex.mask.sum(1)).sum().item<double>() / 17;
  EXPECT_NEAR(out.loss.item<double>(), expect, 1e-12);
  out.loss.backward();
  auto g = -A.unsqueeze(1) * ex.mask / 17;  // (6, 4)
  EXPECT_TRUE(torch::allclose(b.logps.grad(), g, 1e-12, 1e-14));
  auto m = grpo_loss_metrics(out.metrics);
  EXPECT_EQ(metric(m, "clip_ratio/region_mean"), 0.0);
}

TEST(GrpoLoss, SequenceRatioGradientFlowsThroughEveryToken) {
  // GSPO at r = 1: ∂r_i/∂ℓ_{i,t} = r_i · m_t / |o_i|. dapo sums the broadcast p_i over the |o_i|
  // tokens, so the loss holds |o_i| p_i / N and every active token gets −A_i · |o_i| / (|o_i| N) = −A_i / N.
  Example ex;
  auto b = ex.batch();
  b.old_logps = at::Tensor();
  b.ref_logps = at::Tensor();
  b.logps = ex.logps.clone().requires_grad_(true);
  auto o = options("dapo", 0.0);
  o.importance_sampling_level = "sequence";
  grpo_loss(b, o, scaling()).loss.backward();
  auto g = -b.advantages.unsqueeze(1) * ex.mask / 17;
  EXPECT_TRUE(torch::allclose(b.logps.grad(), g, 1e-12, 1e-14)) << b.logps.grad() << g;
  // grpo averages per completion first: −A_i / (|o_i| · B).
  b.logps.mutable_grad() = at::Tensor();
  o.loss_type = "grpo";
  grpo_loss(b, o, scaling()).loss.backward();
  auto gg = -b.advantages.unsqueeze(1) * ex.mask / ex.mask.sum(1, true) / 6;
  EXPECT_TRUE(torch::allclose(b.logps.grad(), gg, 1e-12, 1e-14)) << b.logps.grad() << gg;
  o.loss_type = "dapo";
  // And off-policy (λ ≠ 0) the gradient still reaches every token of an unclipped row: row 1
  // (sequence ratio e^0.0667 inside [0.8, 1.28], A > 0).
  auto c = ex.batch();
  c.logps = ex.logps.clone().requires_grad_(true);
  grpo_loss(c, o, scaling()).loss.backward();
  for (int t = 0; t < 3; ++t) EXPECT_NE(c.logps.grad()[0][t].item<double>(), 0.0) << t;
  EXPECT_EQ(c.logps.grad()[0][3].item<double>(), 0.0);  // padding
}

TEST(GrpoLoss, ValidationListsEveryProblem) {
  auto o = options("dapoo");
  o.importance_sampling_level = "seq";
  o.top_entropy_quantile = 0.0;
  auto errors = grpo_validate(o);
  ASSERT_EQ(errors.size(), 3u);
  EXPECT_NE(errors[0].find("grpo, bnpo, dr_grpo, dapo, cispo, sapo"), std::string::npos) << errors[0];
  EXPECT_NE(errors[0].find("did you mean 'dapo'"), std::string::npos) << errors[0];
  Example ex;
  EXPECT_THROW(grpo_loss(ex.batch(), o, scaling()), Error);
  EXPECT_THROW(grpo_loss(ex.batch(), options("dapo"), scaling(1, 0)), Error);  // dapo without N
}

}  // namespace
}  // namespace ptk::rl
