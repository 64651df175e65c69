// Real shapes (label slow): a random-init Qwen2.5-0.5B (24 layers, hidden 896, 14/2 heads,
// intermediate 4864, vocab 151,936, tied) does one packed SFT step at sequence 4096 and one DPO step
// (chosen + rejected rows against a frozen reference), each with AdamW, under a peak-RSS bound.
// Not a numerical reference test (tests/model) and not a speed test (bench/train_step_bench).
//
// Bounds, with P = parameter bytes (494M x 4 B = 1.98 GB): the step's static state is params +
// grads + two AdamW moments = 4P (7.9 GB), the DPO reference adds P. Activations (checkpointed
// layer inputs, one layer's recompute, the fused lm_head op's chunks and its (V, H) gradient) must
// stay under kActivationBound on top of that.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <cstdio>

#include "core/model/lm_head_logprobs.h"
#include "core/model/qwen2.h"
#include "core/optim/adamw.h"
#include "core/runtime/runtime.h"
#include "rl/dpo_loss.h"
#include "sft/sft_loss.h"
#include "tests/shapes/qwen25_05b.h"

namespace ptk {
namespace {

constexpr double kGB = 1e9;
// Estimated from tensor sizes, not yet from a completed run (check the printed lines and tighten):
// 24 checkpointed inputs of 4096 x 896 fp32 (0.35 GB), one layer's recompute (~0.6 GB plus the
// largest document's attention probabilities, 14 x 1536^2 x 4 B = 0.13 GB, a few times over), the
// fused op's chunk and its (V, H) fp32 weight gradient next to the embedding's (2 x 0.54 GB).
constexpr double kActivationBound = 3.0 * kGB;

double rss() { return static_cast<double>(runtime::current_rss_bytes()); }
double peak_rss() { return static_cast<double>(runtime::peak_rss_bytes()); }
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double param_bytes(const model::Qwen2Model& m) {
  double b = 0;
  for (const auto& [n, t] : m.named_parameters()) b += static_cast<double>(t.numel() * t.element_size());
  return b;
}

// Every parameter has a finite gradient; returns the global gradient norm.
double check_grads(const model::Qwen2Model& m) {
  double sq = 0;
  for (const auto& [n, t] : m.named_parameters()) {
    EXPECT_TRUE(t.grad().defined()) << n << " has no gradient";
    if (!t.grad().defined()) continue;
    // norm(), not pow(2).sum(): no gradient-sized temporary (544 MB for the embedding) in the peak
    // this test measures; freed memory is kept by the process, so a temporary can grow the heap.
    const double norm = t.grad().norm().item<double>();
    const double s = norm * norm;
    EXPECT_TRUE(std::isfinite(s)) << n << " has a non-finite gradient";
    sq += s;
  }
  return std::sqrt(sq);
}

TEST(RealShapes, PackedSftStepSeq4096) {
  runtime::init(0);
  const auto c = test::qwen25_05b_config();
  auto m = model::Qwen2Model::from_config(c, 1);
  m.set_requires_grad(true);
  const double P = param_bytes(m);
  optim::AdamW opt(m.named_parameters(), {});
  // One row of 4096 tokens packing five documents; the first quarter of each is prompt (no loss),
  // which also keeps each document's first token from being a target.
  const int64_t T = 4096;
  const std::vector<int64_t> docs{1536, 1024, 768, 512, 256};
  torch::manual_seed(3);
  auto ids = torch::randint(0, 151643, {1, T}, torch::kLong);
  auto labels = ids.clone();
  auto positions = torch::empty({1, T}, torch::kLong);
  int64_t s = 0;
  for (int64_t len : docs) {
    labels[0].narrow(0, s, len / 4).fill_(-100);
    positions[0].narrow(0, s, len).copy_(torch::arange(len));
    s += len;
  }
  model::ForwardInput in{ids, positions, {}, {docs}};
  model::ForwardOptions fo;
  fo.logits = false;
  fo.activation_checkpointing = true;

  runtime::reset_peak_rss();  // freed memory handed back first: "before" is live data only
  const double static_before = rss();  // params (and whatever the process holds)
  auto t0 = std::chrono::steady_clock::now();
  auto hidden = m.forward(in, fo).hidden;  // (1, T, H)
  auto terms = sft::sft_terms(hidden, m.lm_head_weight(), labels);
  auto loss = terms.nll_sum / static_cast<double>(terms.targets);
  double t_fwd = seconds_since(t0);
  loss.backward();
  hidden = at::Tensor();
  double t_bwd = seconds_since(t0) - t_fwd;
  const double peak_fb = peak_rss();
  double gnorm = check_grads(m);
  auto w0 = m.layers_[0].q_proj_w.detach().clone();
  opt.step(1e-5);
  double t_all = seconds_since(t0);
  const double peak = peak_rss();
  // Activations = what forward+backward raised beyond the gradients they produce.
  const double activations = peak_fb - static_before - P;
  std::printf("  sft step, T=%lld packed (%zu docs), %lld targets: loss %.4f (ln V = %.4f), grad norm %.4f\n",
              static_cast<long long>(T), docs.size(), static_cast<long long>(terms.targets), loss.item<double>(),
              std::log(151936.0), gnorm);
  std::printf("  time: forward+loss %.1f s, backward %.1f s, step total %.1f s\n", t_fwd, t_bwd, t_all);
  std::printf("  P = %.2f GB; RSS before %.2f GB; peak in forward+backward %.2f GB (activations %.2f GB, bound %.1f);"
              " peak with AdamW %.2f GB (bound 4P + %.1f = %.2f GB)\n",
              P / kGB, static_before / kGB, peak_fb / kGB, activations / kGB, kActivationBound / kGB, peak / kGB,
              kActivationBound / kGB, (4 * P + kActivationBound) / kGB);
  // Random init: logits = h . E with RMS-normed h (|h|^2 ~ H) and E ~ N(0, r^2), so logits ~ N(0, s2 = r^2 H)
  // and the expected cross-entropy is ln V + s2 / 2 (log of the mean of a log-normal); 0.18 here.
  const double s2 = c.initializer_range * c.initializer_range * static_cast<double>(c.hidden_size);
  EXPECT_NEAR(loss.item<double>(), std::log(151936.0) + s2 / 2, 0.1);
  EXPECT_LT(activations, kActivationBound);
  EXPECT_LT(peak - static_before, 3 * P + kActivationBound);  // + grads + two moments + activations
  EXPECT_FALSE(torch::equal(w0, m.layers_[0].q_proj_w.detach())) << "AdamW did not move the weights";
}

// Per-row sums of completion log-probs through the fused op: rows (R, T); completion (R, T-1) marks
// the targets (position s+1 predicted at s) that count.
at::Tensor sequence_logps(const model::Qwen2Model& m, const model::ForwardInput& in, const at::Tensor& completion,
                          bool checkpointed) {
  model::ForwardOptions fo;
  fo.logits = false;
  fo.activation_checkpointing = checkpointed;
  auto hidden = m.forward(in, fo).hidden;  // (R, T, H)
  const int64_t R = hidden.size(0), T = hidden.size(1), H = hidden.size(2);
  auto idx = completion.reshape({-1}).nonzero().squeeze(1);                          // (M)
  auto h = hidden.narrow(1, 0, T - 1).reshape({-1, H}).index_select(0, idx);         // (M, H)
  auto t = in.input_ids.narrow(1, 1, T - 1).reshape({-1}).index_select(0, idx);      // (M)
  auto lp = model::lm_head_logprobs(h, m.lm_head_weight(), t).logprobs;              // (M)
  auto token_logps = torch::zeros({R * (T - 1)}).index_put({idx}, lp).view({R, T - 1});  // (R, T-1)
  return rl::dpo_sequence_logps(token_logps, completion);                            // (R)
}

TEST(RealShapes, DpoStepChosenRejectedSeq1024) {
  runtime::init(0);
  const auto c = test::qwen25_05b_config();
  auto policy = model::Qwen2Model::from_config(c, 2);
  auto reference = policy.clone();  // frozen: no grad
  policy.set_requires_grad(true);
  const double P = param_bytes(policy);
  optim::AdamW opt(policy.named_parameters(), {});
  // One pair, rows of 1024: a shared 512-token prompt, chosen completion 512 tokens, rejected 384
  // (right-padded by 128).
  const int64_t T = 1024, prompt = 512;
  const int64_t lens[2] = {1024, 896};
  torch::manual_seed(4);
  auto ids = torch::randint(0, 151643, {2, T}, torch::kLong);
  ids[1].narrow(0, 0, prompt).copy_(ids[0].narrow(0, 0, prompt));
  auto mask = torch::zeros({2, T}, torch::kLong);
  auto completion = torch::zeros({2, T - 1}, torch::kLong);  // target s+1 predicted at s
  for (int r = 0; r < 2; ++r) {
    mask[r].narrow(0, 0, lens[r]).fill_(1);
    completion[r].narrow(0, prompt - 1, lens[r] - prompt).fill_(1);
  }
  ids[1].narrow(0, lens[1], T - lens[1]).fill_(151643);  // pad id
  model::ForwardInput in{ids, {}, mask, {}};

  runtime::reset_peak_rss();  // freed memory handed back first: "before" is live data only
  const double static_before = rss();  // policy + reference
  auto t0 = std::chrono::steady_clock::now();
  at::Tensor ref;
  {
    torch::NoGradGuard ng;
    ref = sequence_logps(reference, in, completion, false);  // (2)
  }
  auto pol = sequence_logps(policy, in, completion, true);  // (2), differentiable
  rl::DpoPairLogps pairs{pol.narrow(0, 0, 1), pol.narrow(0, 1, 1), ref.narrow(0, 0, 1), ref.narrow(0, 1, 1),
                         completion[0].sum().view({1}).to(at::kFloat), completion[1].sum().view({1}).to(at::kFloat)};
  rl::DpoLossOptions lo;  // sigmoid, beta 0.1
  auto out = rl::dpo_loss(pairs, lo);
  double t_fwd = seconds_since(t0);
  out.loss.backward();
  double t_bwd = seconds_since(t0) - t_fwd;
  const double peak_fb = peak_rss();
  double gnorm = check_grads(policy);
  opt.step(1e-6);
  double t_all = seconds_since(t0);
  const double peak = peak_rss();
  const double activations = peak_fb - static_before - P;
  std::printf("  dpo step, 2 rows x %lld (completions %lld / %lld): logps policy %.3f / %.3f, reference %.3f / %.3f,"
              " loss %.6f (ln 2 = %.6f), grad norm %.4g\n",
              static_cast<long long>(T), static_cast<long long>(lens[0] - prompt),
              static_cast<long long>(lens[1] - prompt), pol[0].item<double>(), pol[1].item<double>(),
              ref[0].item<double>(), ref[1].item<double>(), out.loss.item<double>(), std::log(2.0), gnorm);
  std::printf("  time: reference + policy forward + loss %.1f s, backward %.1f s, step total %.1f s\n", t_fwd, t_bwd,
              t_all);
  std::printf("  P = %.2f GB; RSS before (policy + reference) %.2f GB; peak in forward+backward %.2f GB "
              "(activations %.2f GB, bound %.1f); peak with AdamW %.2f GB (bound 5P + %.1f = %.2f GB)\n",
              P / kGB, static_before / kGB, peak_fb / kGB, activations / kGB, kActivationBound / kGB, peak / kGB,
              kActivationBound / kGB, (5 * P + kActivationBound) / kGB);
  // At step 0 the policy is the reference: every log-ratio is 0 and the sigmoid loss is ln 2.
  EXPECT_NEAR(out.loss.item<double>(), std::log(2.0), 1e-4);
  EXPECT_NEAR(pol[0].item<double>(), ref[0].item<double>(), 1e-3 * std::abs(ref[0].item<double>()));
  EXPECT_LT(activations, kActivationBound);
  EXPECT_LT(peak - static_before, 3 * P + kActivationBound);
  EXPECT_GT(gnorm, 0.0);
}

}  // namespace
}  // namespace ptk
