// decode_attention_rows (the per-row CPU decode attention forward_cached uses on AVX-512 CPUs)
// against softmax(q K^T / sqrt(D)) V computed with ATen ops row by row: grouped-query shapes of
// Qwen2.5 (g = 2 and 7, head_dim 64 and 128), contexts from 1 key to the whole cache, slots in any
// order. Not a speed test (bench/rollout_bench --decode-attention).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "core/kernels/cpu/decode_attention_cpu.h"
#include "core/util/error.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

TEST(DecodeAttentionRows, EqualsPerRowSoftmaxAttention) {
  torch::manual_seed(0);
  struct Shape {
    int64_t nh, nkv, D;
    double q_scale = 2.0;  // 2: sharper softmaxes than unit scale
  };
  // The last shape again with queries 40x larger: softmaxes peaked on one key, exponents far below
  // -87 (where expf underflows).
  for (Shape sh : {Shape{4, 2, 64}, Shape{14, 2, 64}, Shape{28, 4, 128}, Shape{28, 4, 128, 40.0}}) {
    const int64_t S = 6, T_max = 40;
    auto K = torch::randn({S, sh.nkv, T_max, sh.D}), V = torch::randn({S, sh.nkv, T_max, sh.D});
    if (!kernels::cpu::decode_attention_rows_supported(K, K)) PTK_SKIP_WITHOUT("avx512") << "no AVX-512F on this CPU";
    const std::vector<int64_t> slots = {4, 0, 5, 2}, lens = {1, 17, 40, 33};
    const int64_t R = static_cast<int64_t>(slots.size()), g = sh.nh / sh.nkv;
    auto q = torch::randn({R, sh.nh, sh.D}) * sh.q_scale;
    auto got = kernels::cpu::decode_attention_rows(q, K, V, slots, lens);
    ASSERT_EQ(got.sizes(), q.sizes());
    double worst = 0;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < sh.nh; ++j) {
        auto k = K[slots[r]][j / g].narrow(0, 0, lens[r]).to(torch::kDouble);  // (len, D)
        auto v = V[slots[r]][j / g].narrow(0, 0, lens[r]).to(torch::kDouble);
        auto p = torch::softmax(torch::mv(k, q[r][j].to(torch::kDouble)) / std::sqrt(double(sh.D)), 0);
        auto want = torch::mv(v.t(), p);
        const double err = (got[r][j].to(torch::kDouble) - want).abs().max().item<double>();
        EXPECT_LE(err, 1e-5) << "nh " << sh.nh << " nkv " << sh.nkv << " D " << sh.D << " row " << r << " head " << j;
        worst = std::max(worst, err);
      }
    // A row alone gives the bits it gives in the batch.
    auto alone = kernels::cpu::decode_attention_rows(q.narrow(0, 2, 1), K, V, {slots[2]}, {lens[2]});
    EXPECT_TRUE(torch::equal(alone[0], got[2]));
    std::printf("  nh %lld / nkv %lld, D %lld, q x %.0f: max |diff| vs float64 reference %.3g\n", (long long)sh.nh,
                (long long)sh.nkv, (long long)sh.D, sh.q_scale, worst);
  }
}

TEST(DecodeAttentionRows, RefusesKeyCountsOutsideTheCache) {
  auto K = torch::zeros({2, 1, 8, 16});
  if (!kernels::cpu::decode_attention_rows_supported(K, K)) PTK_SKIP_WITHOUT("avx512") << "no AVX-512F on this CPU";
  auto q = torch::zeros({1, 2, 16});
  EXPECT_THROW(kernels::cpu::decode_attention_rows(q, K, K, {0}, {0}), Error);
  EXPECT_THROW(kernels::cpu::decode_attention_rows(q, K, K, {0}, {9}), Error);
  EXPECT_FALSE(kernels::cpu::decode_attention_rows_supported(q, torch::zeros({2, 1, 8, 12})));  // head_dim not 16k
  EXPECT_FALSE(kernels::cpu::decode_attention_rows_supported(q.to(torch::kDouble), K));
}

}  // namespace
}  // namespace ptk
