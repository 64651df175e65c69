// The sampler chain on hand-made logit rows: each filter keeps exactly the tokens worked out by
// hand, log-probs stay those of the full softmax, draws follow the inverse CDF, the uniform stream
// depends only on (seed, sample, step). Not the engine (engine_test).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <set>

#include "core/util/error.h"
#include "rollout/sampling.h"

namespace ptk::rollout {
namespace {

// probabilities 0.5, 0.3, 0.15, 0.05 as logits (log p), one row.
at::Tensor row() { return torch::tensor({std::log(0.5), std::log(0.3), std::log(0.15), std::log(0.05)}, torch::kFloat).unsqueeze(0); }

std::vector<int64_t> kept(const at::Tensor& x) {
  std::vector<int64_t> out;
  for (int64_t j = 0; j < x.size(1); ++j)
    if (std::isfinite(x[0][j].item<float>())) out.push_back(j);
  return out;
}

TEST(Sampling, TopKKeepsTheKLargest) {
  auto x = row();
  apply_top_k_(x, {SamplingParams{1.0, 1.0, 2}});
  EXPECT_EQ(kept(x), (std::vector<int64_t>{0, 1}));
  auto y = row();
  apply_top_k_(y, {SamplingParams{1.0, 1.0, 0}});  // off
  EXPECT_EQ(kept(y).size(), 4u);
}

TEST(Sampling, TopPKeepsTheSmallestNucleusReachingP) {
  // Mass before each token: 0, 0.5, 0.8, 0.95. top_p 0.7 keeps {0, 1} (0.8 >= 0.7 stops token 2);
  // top_p 0.5 keeps {0} (0.5 is not below 0.5); top_p 0.81 keeps {0, 1, 2}.
  for (auto [p, n] : std::vector<std::pair<double, size_t>>{{0.7, 2}, {0.5, 1}, {0.81, 3}, {0.2, 1}}) {
    auto x = row();
    apply_top_p_(x, {SamplingParams{1.0, p, 0}});
    EXPECT_EQ(kept(x).size(), n) << "top_p " << p;
  }
}

// The nucleus by sorting the whole row, in float64 (the definition apply_top_p_ must reproduce):
// which columns are kept.
at::Tensor full_sort_nucleus(const at::Tensor& x, double p) {
  auto sorted = std::get<0>(x.sort(0, /*descending=*/true));
  auto probs = torch::softmax(sorted.to(torch::kDouble), 0);
  auto before = probs.cumsum(0) - probs;
  const int64_t n_keep = std::max<int64_t>(1, (before < p).sum().item<int64_t>());
  return x >= sorted[n_keep - 1];
}

using TopP = void (*)(at::Tensor&, const std::vector<SamplingParams>&);

TEST(Sampling, TopPOnPeakyAndFlatRowsEqualsTheFullSortNucleus) {
  // Peaky rows have nuclei of a few tokens (inside the sorting path's first candidates); flat rows
  // need thousands (its wider fallbacks; many buckets of the CPU path). Mixed in one batch with
  // rows that skip top-p. Both paths: apply_top_p_ (CPU: bucketed pass) and apply_top_p_sorting_.
  torch::manual_seed(5);
  const int64_t V = 20000;
  std::vector<double> scale = {8.0, 4.0, 2.0, 0.5, 0.05, 6.0, 1.0, 3.0};
  std::vector<double> ps = {0.9, 0.5, 0.99, 0.9, 0.3, 0.999, 0.7, 1.0};
  std::vector<SamplingParams> params;
  for (double p : ps) params.push_back({1.0, p, 0});
  params.push_back({0.0, 0.5, 0});  // greedy: top-p does not apply
  scale.push_back(1.0);
  const int64_t R = static_cast<int64_t>(params.size());
  auto x = torch::randn({R, V}) * torch::tensor(scale, torch::kFloat).unsqueeze(1);
  x.narrow(1, V - 100, 100).fill_(-std::numeric_limits<float>::infinity());  // a vocabulary limit before
  for (TopP f : {TopP(apply_top_p_), TopP(apply_top_p_sorting_)}) {
    const char* name = f == TopP(apply_top_p_) ? "apply_top_p_" : "apply_top_p_sorting_";
    auto y = x.clone();
    f(y, params);
    int64_t widest = 0, narrowest = V;
    for (int64_t r = 0; r < R; ++r) {
      const bool on = !params[r].greedy() && params[r].top_p < 1.0;
      auto want = on ? full_sort_nucleus(x[r], params[r].top_p) : torch::isfinite(x[r]);
      EXPECT_TRUE(torch::equal(torch::isfinite(y[r]), want)) << name << " row " << r << ": kept " << torch::isfinite(y[r]).sum().item<int64_t>() << ", want " << want.sum().item<int64_t>();
      EXPECT_TRUE(torch::equal(y[r].masked_select(want), x[r].masked_select(want))) << name << " row " << r;  // kept as they were
      if (on) {
        const int64_t n = want.sum().item<int64_t>();
        widest = std::max(widest, n);
        narrowest = std::min(narrowest, n);
      }
    }
    EXPECT_LT(narrowest, 50) << name;  // within the sorting path's first candidates
    EXPECT_GT(widest, 5000) << name;   // past its 256 candidates: its full sort
  }
}

TEST(Sampling, TopPCpuPathOnTiesWideRangesAndTopPNearOne) {
  // The CPU path's edges against the full-sort definition and the sorting path: ties at the
  // threshold (integer logits; a constant row, one bucket holding every token), top_p so near 1
  // that the nucleus reaches past the 32 nats of named buckets into the last one (each of its
  // tokens holds ~7e-15 of the mass, ~34 float64 ulps of 1: half a token from the boundary either
  // way), a row 0.2 nats apart, one finite column, a single-token nucleus, a row of -inf.
  torch::manual_seed(3);
  const int64_t V = 3000;
  const float inf = std::numeric_limits<float>::infinity();
  auto x = torch::zeros({7, V});
  x[0] = torch::randint(-3, 4, {V}).to(torch::kFloat);  // 7 distinct values, ~430 ties each
  // x[1] stays constant
  x[2].fill_(-inf);
  x[2][0] = 0.0f;
  for (int64_t i = 0; i < 40; ++i) x[2][1 + i] = -32.5f - 0.01f * static_cast<float>(i);
  x[3].fill_(-inf);
  x[3][17] = 2.0f;
  x[4] = torch::randn({V}) * 0.1;
  x[4][5] = 40.0f;  // one token holds all the mass
  x[5] = torch::linspace(0.0, -600.0, V);
  x[6].fill_(-inf);
  std::vector<SamplingParams> params = {{1.0, 0.6, 0}, {1.0, 0.5, 0}, {1.0, 1.0 - 1.5e-13, 0}, {1.0, 0.9, 0},
                                        {1.0, 0.99, 0}, {1.0, 0.95, 0}, {1.0, 0.9, 0}};
  auto y = x.clone(), z = x.clone();
  apply_top_p_(y, params);
  apply_top_p_sorting_(z, params);
  for (int64_t r = 0; r < 6; ++r) {
    auto want = full_sort_nucleus(x[r], params[r].top_p);
    EXPECT_TRUE(torch::equal(torch::isfinite(y[r]), want)) << "row " << r << ": kept " << torch::isfinite(y[r]).sum().item<int64_t>() << ", want " << want.sum().item<int64_t>();
    EXPECT_TRUE(torch::equal(torch::isfinite(y[r]), torch::isfinite(z[r]))) << "row " << r;
  }
  EXPECT_EQ(torch::isfinite(y[1]).sum().item<int64_t>(), V);  // a constant row: every token ties
  EXPECT_EQ(torch::isfinite(y[3]).sum().item<int64_t>(), 1);
  EXPECT_EQ(torch::isfinite(y[4]).sum().item<int64_t>(), 1);
  EXPECT_EQ(torch::isfinite(y[2]).sum().item<int64_t>(), 16);  // the max + 15 of the last bucket
  EXPECT_EQ(torch::isfinite(y[5]).sum().item<int64_t>(), 15);  // 1 - e^(-0.2 * 15) >= 0.95
  EXPECT_EQ(torch::isfinite(y[6]).sum().item<int64_t>(), 0);  // nothing to choose: left as it was
}

TEST(Sampling, TemperatureLimitAndLogprobsOfTheFullSoftmax) {
  auto logits = torch::tensor({{1.0f, 2.0f, 3.0f, 4.0f}, {4.0f, 3.0f, 2.0f, 1.0f}});
  std::vector<SamplingParams> ps = {{0.0, 1.0, 0}, {2.0, 0.5, 1}};
  auto d = sample_rows(logits, ps, {0.3, 0.99}, /*vocab_limit=*/3);
  // Row 0 greedy within the first 3 columns: id 2; log-prob under softmax(logits) over all 4.
  EXPECT_EQ(d.ids[0].item<int64_t>(), 2);
  EXPECT_NEAR(d.logprobs[0].item<float>(), torch::log_softmax(logits[0], 0)[2].item<float>(), 1e-6);
  // Row 1 top-k 1 leaves id 0 whatever the uniform; log-prob under softmax(logits / 2), not 0.
  EXPECT_EQ(d.ids[1].item<int64_t>(), 0);
  EXPECT_NEAR(d.logprobs[1].item<float>(), torch::log_softmax(logits[1] / 2.0, 0)[0].item<float>(), 1e-6);
}

TEST(Sampling, UnfilteredRowsDrawWhatTheGeneralChainDraws) {
  // sample_rows takes a shorter path for rows without top-k / top-p; it must draw the ids and give
  // the log-probs that the chain temperature -> limit -> draw gives, for sampled and greedy rows,
  // and for a row whose allowed columns sit far below its excluded ones (that row redone).
  torch::manual_seed(9);
  const int64_t R = 40, V = 3000, lim = 2900;
  auto x = torch::randn({R, V}) * 3;
  x[7].narrow(0, lim, V - lim).fill_(150.0);  // allowed columns underflow relative to the row's max
  std::vector<SamplingParams> ps;
  std::vector<double> u;
  for (int64_t r = 0; r < R; ++r) {
    ps.push_back({r % 5 == 3 ? 0.0 : 0.5 + 0.1 * (r % 7), 1.0, 0});
    u.push_back(sample_uniform(11, r, 0));
  }
  auto d = sample_rows(x, ps, u, lim);
  auto ref = apply_temperature(x, ps);
  auto lse = torch::logsumexp(ref, 1);
  limit_vocab_(ref, lim);
  auto ids = draw(ref, ps, u);
  auto lp = ref.gather(1, ids.unsqueeze(1)).squeeze(1) - lse;
  EXPECT_TRUE(torch::equal(d.ids, ids)) << d.ids << ids;
  EXPECT_TRUE(torch::allclose(d.logprobs, lp, 1e-5, 1e-5)) << (d.logprobs - lp).abs().max();
  EXPECT_LT(d.ids[7].item<int64_t>(), lim);
  EXPECT_TRUE(std::isfinite(d.logprobs[7].item<float>()));
}

TEST(Sampling, UnfilteredRowsDrawTheSameWhateverTheLayoutOfTheLogits) {
  // Contiguous float32 logits on CPU take the row-by-row path; other layouts and dtypes the batched
  // one. Same ids, same log-probs (up to float rounding), greedy and sampled rows, T != 1.
  torch::manual_seed(13);
  const int64_t R = 24, V = 5000, lim = 4900;
  auto xt = torch::randn({V, R}) * 2;  // x = xt.t(): not contiguous
  auto x = xt.t();
  std::vector<SamplingParams> ps;
  std::vector<double> u;
  for (int64_t r = 0; r < R; ++r) {
    ps.push_back({r % 6 == 1 ? 0.0 : 0.7 + 0.1 * (r % 4), 1.0, 0});
    u.push_back(sample_uniform(17, r, 3));
  }
  auto rows = sample_rows(x.contiguous(), ps, u, lim);
  auto batched = sample_rows(x, ps, u, lim);
  auto as_double = sample_rows(x.to(torch::kDouble), ps, u, lim);
  EXPECT_TRUE(torch::equal(rows.ids, batched.ids)) << rows.ids << batched.ids;
  EXPECT_TRUE(torch::equal(rows.ids, as_double.ids));
  EXPECT_TRUE(torch::allclose(rows.logprobs, batched.logprobs, 1e-5, 1e-5));
  EXPECT_TRUE(torch::allclose(rows.logprobs, as_double.logprobs, 1e-5, 1e-5));
  auto ref = torch::log_softmax(x / torch::tensor([&] {
    std::vector<float> t;
    for (const auto& p : ps) t.push_back(p.greedy() ? 1.0f : static_cast<float>(p.temperature));
    return t;
  }()).unsqueeze(1), 1).gather(1, rows.ids.unsqueeze(1)).squeeze(1);
  EXPECT_TRUE(torch::allclose(rows.logprobs, ref, 1e-4, 1e-4)) << (rows.logprobs - ref).abs().max();
  EXPECT_EQ(rows.ids[1].item<int64_t>(), x[1].narrow(0, 0, lim).argmax().item<int64_t>());  // greedy row
}

TEST(Sampling, DrawIsTheInverseCdf) {
  // CDF 0.5, 0.8, 0.95, 1.0: u in (0, 0.5] -> 0, (0.5, 0.8] -> 1, (0.8, 0.95] -> 2, else 3.
  std::vector<std::pair<double, int64_t>> cases = {{0.01, 0}, {0.49, 0}, {0.51, 1}, {0.79, 1}, {0.81, 2}, {0.96, 3}};
  for (auto [u, want] : cases) EXPECT_EQ(draw(row(), {SamplingParams{}}, {u})[0].item<int64_t>(), want) << u;
  auto x = row();
  limit_vocab_(x, 2);  // columns 2, 3 never drawn, even at u near 1
  EXPECT_EQ(draw(x, {SamplingParams{}}, {0.999})[0].item<int64_t>(), 1);
}

TEST(Sampling, UniformStreamDependsOnlyOnSeedSampleStep) {
  EXPECT_EQ(sample_uniform(7, 3, 11), sample_uniform(7, 3, 11));
  std::set<double> seen;
  double sum = 0;
  for (int s = 0; s < 50; ++s)
    for (int t = 0; t < 50; ++t) {
      double u = sample_uniform(1, s, t);
      ASSERT_GT(u, 0.0);
      ASSERT_LT(u, 1.0);
      seen.insert(u);
      sum += u;
    }
  EXPECT_EQ(seen.size(), 2500u);
  EXPECT_NEAR(sum / 2500, 0.5, 0.02);
  EXPECT_NE(sample_uniform(1, 0, 0), sample_uniform(2, 0, 0));
  EXPECT_NE(sample_uniform(1, 0, 1), sample_uniform(1, 1, 0));
}

TEST(Sampling, BadParamsAreRefusedWithTheirName) {
  EXPECT_THROW(validate({-1.0, 1.0, 0}, "request 0"), Error);
  EXPECT_THROW(validate({1.0, 1.5, 0}, "request 0"), Error);
  EXPECT_THROW(validate({1.0, 1.0, -2}, "request 0"), Error);
  try {
    validate({1.0, 0.0, 0}, "request 4");
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("request 4: top_p"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ptk::rollout
