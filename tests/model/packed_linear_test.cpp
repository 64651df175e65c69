// model::PackedLinear (the decode step's LM head without OpenBLAS's per-call repack): equal to
// at::mm over shapes that hit every edge of its kernel (partial panels, partial blocks, row counts
// off its 8-row blocks, odd K), a row's result independent of the batch, the caller's buffer kept,
// bad input refused. Not a speed test (bench/rollout_bench --lm-head).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/model/packed_linear.h"
#include "core/util/error.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

using model::PackedLinear;

bool skip_without_avx512() {
  if (PackedLinear::supported(torch::zeros({4, 4}))) return false;
  std::printf("  this CPU has no AVX-512F: PackedLinear is unavailable and callers use at::mm\n");
  return true;
}

TEST(PackedLinear, EqualsMatmulOverEveryEdgeOfTheKernel) {
  if (skip_without_avx512()) PTK_SKIP_WITHOUT("avx512") << "no AVX-512F on this CPU";
  torch::manual_seed(0);
  double worst = 0;
  // N: under one panel, one panel, one over, a block (48) and its neighbours, several blocks with a
  // partial last panel. K: 1, odd, a multiple of 16. R: 1, under / at / over the 8-row block.
  for (int64_t N : {1, 15, 16, 17, 47, 48, 49, 100, 1001})
    for (int64_t K : {1, 7, 64, 257})
      for (int64_t R : {1, 3, 8, 9, 17}) {
        auto w = torch::randn({N, K});
        auto x = torch::randn({R, K});
        PackedLinear p(w);
        EXPECT_EQ(p.out_features(), N);
        EXPECT_EQ(p.in_features(), K);
        at::Tensor out;
        p.forward_out(x, out);
        ASSERT_EQ(out.sizes(), (std::vector<int64_t>{R, N}));
        auto ref = torch::mm(x.to(torch::kDouble), w.to(torch::kDouble).t());
        const double err = (out.to(torch::kDouble) - ref).abs().max().item<double>();
        const double tol = 1e-5 * std::sqrt(static_cast<double>(K)) * 4;  // float32 sums of K products of N(0,1)^2
        EXPECT_LE(err, tol) << "N " << N << " K " << K << " R " << R;
        worst = std::max(worst, err);
      }
  std::printf("  max |packed - float64 mm| %.3g\n", worst);
}

TEST(PackedLinear, ARowsResultDoesNotDependOnTheOtherRows) {
  if (skip_without_avx512()) PTK_SKIP_WITHOUT("avx512") << "no AVX-512F on this CPU";
  torch::manual_seed(1);
  auto w = torch::randn({200, 96});
  auto x = torch::randn({13, 96});
  PackedLinear p(w);
  at::Tensor all, one;
  p.forward_out(x, all);
  for (int64_t r : {0, 7, 8, 12}) {
    p.forward_out(x.narrow(0, r, 1), one);
    EXPECT_TRUE(torch::equal(one[0], all[r])) << "row " << r << " alone differs from the same row in a batch of 13";
  }
}

TEST(PackedLinear, WritesIntoTheCallersBufferWithoutReallocating) {
  if (skip_without_avx512()) PTK_SKIP_WITHOUT("avx512") << "no AVX-512F on this CPU";
  auto w = torch::randn({50, 32});
  PackedLinear p(w);
  at::Tensor buf;
  const auto& first = p.forward_out(torch::randn({6, 32}), buf);
  EXPECT_EQ(first.data_ptr(), buf.data_ptr());
  const void* storage = buf.storage().data();
  for (int64_t R : {3, 1, 6}) {
    auto x = torch::randn({R, 32});
    p.forward_out(x, buf);
    EXPECT_EQ(buf.storage().data(), storage) << R << " rows reallocated the buffer";
    EXPECT_TRUE(torch::allclose(buf, torch::mm(x, w.t()), 1e-5, 1e-5));
  }
  // A non-contiguous x (a column slice) is read correctly.
  auto wide = torch::randn({4, 64});
  auto x = wide.narrow(1, 10, 32);
  p.forward_out(x, buf);
  EXPECT_TRUE(torch::allclose(buf, torch::mm(x, w.t()), 1e-5, 1e-5));
}

TEST(PackedLinear, RefusesWhatItCannotServe) {
  EXPECT_FALSE(PackedLinear::supported(torch::zeros({4, 4}, torch::kDouble)));
  EXPECT_FALSE(PackedLinear::supported(torch::zeros({4})));
  EXPECT_FALSE(PackedLinear::supported(at::Tensor()));
  EXPECT_THROW(PackedLinear(torch::zeros({4, 4}, torch::kDouble)), Error);
  if (skip_without_avx512()) {
    EXPECT_THROW(PackedLinear(torch::zeros({4, 4})), Error);
    return;
  }
  PackedLinear p(torch::zeros({4, 8}));
  at::Tensor out;
  EXPECT_THROW(p.forward_out(torch::zeros({2, 7}), out), Error);                   // wrong K
  EXPECT_THROW(p.forward_out(torch::zeros({2, 8}, torch::kDouble), out), Error);   // wrong dtype
  EXPECT_THROW(p.forward_out(torch::zeros({8}), out), Error);                      // not 2-D
}

}  // namespace
}  // namespace ptk
