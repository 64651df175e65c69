// causal_block_attention and causal_flash_attention (the training forward's float32 attention)
// against causal softmax attention computed in float64 with plain ATen ops (full score matrix,
// -inf above the diagonal): outputs and the gradients of q, k and v, for grouped-query shapes
// (g = 1, 2, 7), blocks that do and do not divide the sequence, one block for the whole sequence,
// and queries that are the last Lq of Lk > Lq positions.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <vector>

#include "core/kernels/cpu/causal_attention.h"
#include "core/util/error.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

// q (N, heads, Lq, D), k/v (N, kv, Lk, D), float64.
at::Tensor reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const int64_t heads = q.size(1), kv = k.size(1), g = heads / kv, lq = q.size(2), lk = k.size(2), d = q.size(3);
  auto kk = k.repeat_interleave(g, 1), vv = v.repeat_interleave(g, 1);  // head j uses K/V head j / g
  auto mask = torch::full({lq, lk}, -std::numeric_limits<double>::infinity(), q.options()).triu(lk - lq + 1);
  auto scores = torch::matmul(q, kk.transpose(-1, -2)) / std::sqrt(static_cast<double>(d)) + mask;
  return torch::matmul(torch::softmax(scores, -1), vv);
}

// Largest error relative to the largest reference value (or to `floor` when that is smaller: with
// one visible key the q and k gradients are exactly 0, and float32 rounding gives ~1e-8).
double max_rel_err(const at::Tensor& got, const at::Tensor& want, double floor = 1e-30) {
  return ((got.to(torch::kDouble) - want).abs().max() / want.abs().max().clamp_min(floor)).item<double>();
}

struct Case {
  int64_t n, heads, kv, lq, lk, d, block;
};

using Attention = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);

// One case of `attend` against reference(): output and the q, k, v gradients within 1e-5 of the
// largest reference value (`qk_floor` as for max_rel_err, on the q and k gradients).
void expect_matches_reference(const Case& c, Attention attend, double qk_floor) {
  torch::manual_seed(c.lq * 31 + c.block);
  auto q = (torch::randn({c.n, c.heads, c.lq, c.d}) * 2).requires_grad_(true);
  auto k = torch::randn({c.n, c.kv, c.lk, c.d}).requires_grad_(true);
  auto v = torch::randn({c.n, c.kv, c.lk, c.d}).requires_grad_(true);
  auto grad_out = torch::randn({c.n, c.heads, c.lq, c.d});

  auto out = attend(q, k, v, c.block);
  ASSERT_EQ(out.sizes(), q.sizes());
  (out * grad_out).sum().backward();

  auto q64 = q.detach().to(torch::kDouble).requires_grad_(true);
  auto k64 = k.detach().to(torch::kDouble).requires_grad_(true);
  auto v64 = v.detach().to(torch::kDouble).requires_grad_(true);
  auto want = reference(q64, k64, v64);
  (want * grad_out.to(torch::kDouble)).sum().backward();

  EXPECT_LT(max_rel_err(out.detach(), want.detach()), 1e-5);
  EXPECT_LT(max_rel_err(q.grad(), q64.grad(), qk_floor), 1e-5);
  EXPECT_LT(max_rel_err(k.grad(), k64.grad(), qk_floor), 1e-5);
  EXPECT_LT(max_rel_err(v.grad(), v64.grad()), 1e-5);
}

::testing::Message describe(const Case& c) {
  return ::testing::Message() << "n " << c.n << " heads " << c.heads << " kv " << c.kv << " Lq " << c.lq << " Lk "
                              << c.lk << " D " << c.d << " block " << c.block;
}

TEST(CausalBlockAttention, EqualsMaskedSoftmaxAttentionWithGradients) {
  for (Case c : {Case{2, 14, 2, 37, 37, 16, 8}, Case{1, 4, 4, 5, 12, 8, 2}, Case{1, 6, 3, 20, 20, 8, 128},
                 Case{2, 4, 2, 33, 33, 32, 11}, Case{1, 2, 1, 1, 1, 4, 1}}) {
    SCOPED_TRACE(describe(c));
    expect_matches_reference(c, &kernels::cpu::causal_block_attention, 1e-30);
  }
}

// Restores the intra-op thread count when a test ends, however it ends.
struct ThreadCountGuard {
  int saved = at::get_num_threads();
  ~ThreadCountGuard() { at::set_num_threads(saved); }
};

// The flash kernels on the same reference: grouped-query shapes (g = 1, 2, 7), head sizes 16, 32,
// 64, 80 (a partial 64-column tile) and 128 (two tiles), blocks of rows that do and do not divide
// the rows (6 rows per micro-kernel tile and the remainders), keys that are not a multiple of the
// 64-key panel, and queries that are the last Lq of Lk > Lq positions; on 1, 2 and 4 intra-op
// threads (each worker accumulates its own dK / dV; 4 is more workers than some shapes' blocks).
TEST(CausalFlashAttention, EqualsMaskedSoftmaxAttentionWithGradients) {
  if (!kernels::cpu::causal_flash_attention_supported(torch::zeros({1, 1, 1, 16}), torch::zeros({1, 1, 1, 16}),
                                               torch::zeros({1, 1, 1, 16})))
    PTK_SKIP_WITHOUT("avx512") << "no AVX-512F on this CPU: the flash kernels do not run here";
  ThreadCountGuard guard;
  for (int t : {1, 2, 4}) {
    at::set_num_threads(t);
    for (Case c : {Case{2, 14, 2, 37, 37, 16, 8}, Case{1, 4, 4, 5, 12, 16, 2}, Case{1, 6, 3, 70, 70, 64, 48},
                   Case{2, 4, 2, 33, 100, 80, 11}, Case{1, 2, 1, 1, 1, 16, 1}, Case{1, 14, 2, 150, 150, 64, 48},
                   Case{1, 2, 2, 130, 130, 32, 600}, Case{1, 4, 2, 40, 90, 128, 7}}) {
      SCOPED_TRACE(describe(c) << " threads " << t);
      // With one visible key (Lk = 1) the q and k gradients are exactly 0: compare absolutely there.
      expect_matches_reference(c, &kernels::cpu::causal_flash_attention, c.lk == 1 ? 1.0 : 1e-30);
    }
  }
}

// Training runs repeat bit for bit at a given thread count: the per-worker dK / dV sums must not
// depend on which thread got which block first.
TEST(CausalFlashAttention, GradientsRepeatBitForBitOnTwoThreads) {
  if (!kernels::cpu::causal_flash_attention_supported(torch::zeros({1, 1, 1, 16}), torch::zeros({1, 1, 1, 16}),
                                               torch::zeros({1, 1, 1, 16})))
    PTK_SKIP_WITHOUT("avx512") << "no AVX-512F on this CPU: the flash kernels do not run here";
  ThreadCountGuard guard;
  at::set_num_threads(2);
  torch::manual_seed(7);
  auto q = torch::randn({2, 14, 300, 64}).requires_grad_(true);
  auto k = torch::randn({2, 2, 300, 64}).requires_grad_(true), v = torch::randn({2, 2, 300, 64}).requires_grad_(true);
  auto grad_out = torch::randn({2, 14, 300, 64});
  std::vector<at::Tensor> first;
  for (int run = 0; run < 6; ++run) {
    q.mutable_grad().reset();
    k.mutable_grad().reset();
    v.mutable_grad().reset();
    kernels::cpu::causal_flash_attention(q, k, v, 12).backward(grad_out);
    if (run == 0) {
      first = {q.grad().clone(), k.grad().clone(), v.grad().clone()};
      continue;
    }
    EXPECT_TRUE(torch::equal(q.grad(), first[0])) << "run " << run;
    EXPECT_TRUE(torch::equal(k.grad(), first[1])) << "run " << run;
    EXPECT_TRUE(torch::equal(v.grad(), first[2])) << "run " << run;
  }
}

TEST(CausalFlashAttention, RejectsBadShapes) {
  auto q = torch::randn({1, 3, 4, 16}), k = torch::randn({1, 2, 4, 16});
  EXPECT_THROW(kernels::cpu::causal_flash_attention(q, k, k), Error);  // 3 heads over 2 K/V heads
  auto q8 = torch::randn({1, 2, 4, 8}), k8 = torch::randn({1, 1, 4, 8});
  EXPECT_THROW(kernels::cpu::causal_flash_attention(q8, k8, k8), Error);  // head size not a multiple of 16
  EXPECT_THROW(kernels::cpu::causal_flash_attention(q.narrow(1, 0, 2), k, k, 0), Error);
}

TEST(CausalBlockAttention, RejectsBadShapes) {
  auto q = torch::randn({1, 3, 4, 8}), k = torch::randn({1, 2, 4, 8});
  EXPECT_THROW(kernels::cpu::causal_block_attention(q, k, k), Error);  // 3 heads over 2 K/V heads
  auto k_short = torch::randn({1, 1, 3, 8});
  EXPECT_THROW(kernels::cpu::causal_block_attention(q, k_short, k_short), Error);  // Lq > Lk
  EXPECT_THROW(kernels::cpu::causal_block_attention(q.to(torch::kDouble), k.narrow(1, 0, 1).to(torch::kDouble),
                                             k.narrow(1, 0, 1).to(torch::kDouble)),
               Error);
}

}  // namespace
}  // namespace ptk
