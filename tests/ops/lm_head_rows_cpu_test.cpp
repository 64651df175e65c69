// The lm_head op's AVX-512 row passes against the same quantities from ATen ops in float64: the
// log-sum-exp, log-prob at the target, entropy and argmax hit of each row, and the in-place
// log-prob gradient. Row lengths around the 16- and 64-float strides and the real vocabulary
// (151,936); ties for the max (the first index wins, as torch.argmax); peaked rows.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/kernels/cpu/lm_head_rows_cpu.h"
#include "core/util/error.h"
#include "tests/support/test_util.h"

namespace ptk::kernels::cpu {
namespace {

TEST(LmHeadRowsCpu, StatsAndGradientEqualAtenInFloat64) {
  for (int64_t V : {1, 15, 16, 17, 63, 64, 65, 1000, 151936}) {
    SCOPED_TRACE("V = " + std::to_string(V));
    torch::manual_seed(V);
    const int64_t rows = V > 10000 ? 4 : 9;
    auto z = torch::randn({rows, V}) * 3;
    z[1] *= 40;  // one peaked row: exponents far below expf's -87
    auto t = torch::randint(0, V, {rows}, torch::kInt64);
    if (V > 1) {
      z[2].fill_(0.5);  // every entry ties: argmax is 0
      z[3][V - 1] = 100;
      t[3] = V - 1;     // the max in the tail
    }
    if (!lm_head_rows_supported(z)) PTK_SKIP_WITHOUT("avx512") << "no AVX-512F on this CPU";
    auto lse = torch::empty({rows}), logp = torch::empty({rows}), ent = torch::empty({rows});
    auto correct = torch::empty({rows}, torch::kBool);
    lm_head_row_stats(z, t, lse, logp, ent, correct);

    auto z64 = z.to(torch::kDouble);
    auto lp64 = torch::log_softmax(z64, 1);
    auto want_lse = torch::logsumexp(z64, 1);
    auto want_logp = lp64.gather(1, t.unsqueeze(1)).squeeze(1);
    auto want_ent = -(lp64.exp() * lp64).sum(1);
    auto want_correct = z.argmax(1).eq(t);
    EXPECT_LT((lse.to(torch::kDouble) - want_lse).abs().max().item<double>(), 2e-5 * (1 + want_lse.abs().max().item<double>()));
    EXPECT_LT((logp.to(torch::kDouble) - want_logp).abs().max().item<double>(), 2e-4);
    EXPECT_LT((ent.to(torch::kDouble) - want_ent).abs().max().item<double>(), 2e-4);
    EXPECT_TRUE(torch::equal(correct, want_correct));
    if (V > 1) {
      EXPECT_EQ(correct[2].item<bool>(), t[2].item<int64_t>() == 0);  // all tied: index 0 is the argmax
    }

    // Gradient of sum_r g_r logp_r, scaled (a temperature's 1/T).
    auto g = torch::randn({rows});
    const double scale = 1.25;
    auto dz = z.clone();
    lm_head_logp_grad_inplace(dz, t, lse, g, scale);
    auto onehot = torch::zeros({rows, V}, torch::kDouble).scatter_(1, t.unsqueeze(1), 1.0);
    auto want_dz = scale * g.to(torch::kDouble).unsqueeze(1) * (onehot - lp64.exp());
    EXPECT_LT((dz.to(torch::kDouble) - want_dz).abs().max().item<double>(), 2e-5);
  }
}

TEST(LmHeadRowsCpu, RejectsWhatItCannotRead) {
  auto z = torch::randn({4, 32});
  if (!lm_head_rows_supported(z)) PTK_SKIP_WITHOUT("avx512") << "no AVX-512F on this CPU";
  EXPECT_FALSE(lm_head_rows_supported(z.t()));
  EXPECT_FALSE(lm_head_rows_supported(z.to(torch::kDouble)));
  auto v = torch::empty({4});
  auto c = torch::empty({4}, torch::kBool);
  EXPECT_THROW(lm_head_row_stats(z, torch::zeros({4}, torch::kInt32), v, v, v, c), Error);
  EXPECT_THROW(lm_head_row_stats(z, torch::zeros({3}, torch::kInt64), v, v, v, c), Error);
}

}  // namespace
}  // namespace ptk::kernels::cpu
