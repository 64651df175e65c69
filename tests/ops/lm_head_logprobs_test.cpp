// The fused lm_head + log-softmax op against the plain (N x V logits) computation: values and
// gradients, across chunk boundaries, with temperature and masked vocabulary rows; each case both
// with the logits kept for backward (they fit keep_logits_bytes) and recomputed (keep_logits_bytes 0),
// and through the AVX-512 row kernels (where the CPU has them) and ATen's ops (PTK_LM_HEAD_ROWS=aten).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>

#include "core/kernels/dispatch.h"
#include "core/model/lm_head_logprobs.h"

namespace ptk::model {
namespace {

struct Ref {
  at::Tensor logp, ent, correct;
};

Ref reference(const at::Tensor& h, const at::Tensor& w, const at::Tensor& t, double temp, int64_t valid) {
  // Masked rows (>= valid) have probability 0: the reference simply leaves them out.
  at::Tensor z = torch::mm(h, (valid > 0 ? w.slice(0, 0, valid) : w).t()) / temp;
  at::Tensor lp = torch::log_softmax(z, 1);
  at::Tensor ent = -(lp.exp() * lp).sum(1);
  return {lp.gather(1, t.unsqueeze(1)).squeeze(1), ent, z.argmax(1).eq(t)};
}

void check_once(double temp, int64_t valid, int64_t chunk, bool keep) {
  SCOPED_TRACE(keep ? "logits kept for backward" : "logits recomputed in backward");
  torch::manual_seed(7);
  const int64_t n = 37, hdim = 16, v = 50;
  auto h0 = torch::randn({n, hdim}), w0 = torch::randn({v, hdim}) * 0.5;
  auto t = torch::randint(0, valid > 0 ? valid : v, {n}, torch::kInt64);
  auto g_lp = torch::randn({n}), g_ent = torch::randn({n});

  auto h1 = h0.clone().requires_grad_(true), w1 = w0.clone().requires_grad_(true);
  LogProbOptions o;
  o.temperature = temp;
  o.chunk_rows = chunk;
  o.valid_vocab = valid;
  o.keep_logits_bytes = keep ? o.keep_logits_bytes : 0;
  auto out = lm_head_logprobs(h1, w1, t, o);
  ((out.logprobs * g_lp).sum() + (out.entropy * g_ent).sum()).backward();

  auto h2 = h0.clone().requires_grad_(true), w2 = w0.clone().requires_grad_(true);
  auto ref = reference(h2, w2, t, temp, valid);
  ((ref.logp * g_lp).sum() + (ref.ent * g_ent).sum()).backward();

  auto maxdiff = [](const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); };
  EXPECT_LT(maxdiff(out.logprobs, ref.logp), 1e-5);
  EXPECT_LT(maxdiff(out.entropy, ref.ent), 1e-5);
  EXPECT_TRUE(torch::equal(out.correct, ref.correct));
  double dh = maxdiff(h1.grad(), h2.grad()), dw = maxdiff(w1.grad(), w2.grad());
  EXPECT_LT(dh, 1e-4) << "max |d hidden diff| " << dh;
  EXPECT_LT(dw, 1e-4) << "max |d weight diff| " << dw;
}

void check(double temp, int64_t valid, int64_t chunk, bool keep) {
  for (bool aten : {false, true}) {
    SCOPED_TRACE(aten ? "ATen passes" : "row kernels where supported");
    kernels::Options o = kernels::options();
    if (aten) o.lm_head = kernels::LmHead::kRef;
    kernels::ScopedOptions scoped(o);
    check_once(temp, valid, chunk, keep);
  }
}

TEST(LmHeadLogProbs, MatchesPlainComputation) {
  check(1.0, 0, 0, true);
  check(1.0, 0, 0, false);
}
TEST(LmHeadLogProbs, ChunksSmallerThanBatch) {
  check(1.0, 0, 5, true);
  check(1.0, 0, 5, false);
}
TEST(LmHeadLogProbs, TemperatureAndMaskedVocab) {
  check(0.7, 41, 8, true);
  check(0.7, 41, 8, false);
}

// Backward overwrites the kept logits with the gradient; a second backward through a retained
// graph must recompute them and give the same gradients again.
TEST(LmHeadLogProbs, SecondBackwardThroughRetainedGraph) {
  torch::manual_seed(5);
  auto h = torch::randn({11, 8}).requires_grad_(true), w = torch::randn({30, 8}).requires_grad_(true);
  auto t = torch::randint(0, 30, {11}, torch::kInt64);
  LogProbOptions o;
  o.chunk_rows = 4;
  auto out = lm_head_logprobs(h, w, t, o);
  auto loss = out.logprobs.sum() + 0.3 * out.entropy.sum();
  loss.backward({}, /*retain_graph=*/true);
  auto gh = h.grad().clone(), gw = w.grad().clone();
  h.mutable_grad().reset();
  w.mutable_grad().reset();
  loss.backward();
  EXPECT_LT((h.grad() - gh).abs().max().item<double>(), 1e-6);
  EXPECT_LT((w.grad() - gw).abs().max().item<double>(), 1e-6);
}

TEST(LmHeadLogProbs, OnlyLogprobGradient) {
  torch::manual_seed(3);
  auto h = torch::randn({9, 8}).requires_grad_(true), w = torch::randn({20, 8}).requires_grad_(true);
  auto t = torch::randint(0, 20, {9}, torch::kInt64);
  LogProbOptions o;
  o.chunk_rows = 4;
  lm_head_logprobs(h, w, t, o).logprobs.sum().backward();
  auto h2 = h.detach().clone().requires_grad_(true), w2 = w.detach().clone().requires_grad_(true);
  torch::log_softmax(torch::mm(h2, w2.t()), 1).gather(1, t.unsqueeze(1)).sum().backward();
  EXPECT_LT((h.grad() - h2.grad()).abs().max().item<double>(), 1e-5);
  EXPECT_LT((w.grad() - w2.grad()).abs().max().item<double>(), 1e-5);
}

// A frozen weight (LoRA's base): no weight gradient is made, and the hidden gradient is the same, with
// the logits kept and recomputed, in fp32 and bf16.
TEST(LmHeadLogProbs, FrozenWeightGetsNoGradientAndTheSameHiddenGradient) {
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    for (int64_t keep : {int64_t{1} << 30, int64_t{0}}) {
      torch::manual_seed(5);
      auto h0 = torch::randn({11, 8}).to(dtype), w0 = (torch::randn({30, 8}) * 0.5).to(dtype);
      auto t = torch::randint(0, 30, {11}, torch::kInt64);
      LogProbOptions o;
      o.chunk_rows = 4;
      o.keep_logits_bytes = keep;
      auto h1 = h0.clone().requires_grad_(true), w1 = w0.clone().requires_grad_(true);
      auto out1 = lm_head_logprobs(h1, w1, t, o);
      ((out1.logprobs * 1.5).sum() + out1.entropy.sum()).backward();
      auto h2 = h0.clone().requires_grad_(true), w2 = w0.clone();  // frozen
      auto out2 = lm_head_logprobs(h2, w2, t, o);
      ((out2.logprobs * 1.5).sum() + out2.entropy.sum()).backward();
      EXPECT_FALSE(w2.grad().defined());
      EXPECT_TRUE(torch::equal(h1.grad(), h2.grad())) << c10::toString(dtype) << " keep " << keep;
    }
  }
}

}  // namespace
}  // namespace ptk::model
