// Activation checkpointing (ForwardOptions::activation_checkpointing) against the plain path on a
// small random Qwen2: same loss, same gradient for every parameter on packed, right- and
// left-padded batches; and lower peak RSS at a moderate shape. Not an HF reference test (qwen2_test).
#include <gtest/gtest.h>
#include <malloc.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <map>

#include "core/model/qwen2.h"
#include "core/runtime/runtime.h"

namespace ptk::model {
namespace {

checkpoint::Qwen2Config small_config(int64_t hidden, int64_t inter, int64_t layers, int64_t heads, int64_t kv,
                                     int64_t vocab) {
  checkpoint::Qwen2Config c;
  c.vocab_size = vocab;
  c.hidden_size = hidden;
  c.intermediate_size = inter;
  c.num_hidden_layers = layers;
  c.num_attention_heads = heads;
  c.num_key_value_heads = kv;
  c.head_dim = hidden / heads;
  c.max_position_embeddings = 4096;
  c.rope_theta = 1e6;
  c.tie_word_embeddings = true;
  return c;
}

// A loss that weights every logit differently, so every parameter gets a distinct gradient.
at::Tensor loss_of(const Qwen2Model& m, const ForwardInput& in, bool checkpointed, const at::Tensor& w) {
  ForwardOptions o;
  o.activation_checkpointing = checkpointed;
  auto logits = m.forward(in, o).logits;  // (B, T, V)
  auto keep = in.attention_mask.defined() ? in.attention_mask.to(at::kFloat).unsqueeze(-1) : at::ones({1}, at::kFloat);
  return (at::log_softmax(logits, -1) * w * keep).sum();
}

std::map<std::string, at::Tensor> grads_of(Qwen2Model& m, const ForwardInput& in, bool checkpointed,
                                           const at::Tensor& w, double* loss) {
  for (auto& [n, p] : m.named_parameters()) p.mutable_grad() = at::Tensor();
  auto l = loss_of(m, in, checkpointed, w);
  l.backward();
  *loss = l.item<double>();
  std::map<std::string, at::Tensor> g;
  for (auto& [n, p] : m.named_parameters()) g[n] = p.grad().defined() ? p.grad().clone() : at::Tensor();
  return g;
}

void expect_same_gradients(const std::string& what, Qwen2Model& m, const ForwardInput& in) {
  const int64_t B = in.input_ids.size(0), T = in.input_ids.size(1), V = m.config().vocab_size;
  auto w = torch::randn({B, T, V});
  double loss_plain = 0, loss_ckpt = 0;
  auto plain = grads_of(m, in, false, w, &loss_plain);
  auto ckpt = grads_of(m, in, true, w, &loss_ckpt);
  double worst = 0, worst_rel = 0;
  std::string worst_name = "all bitwise equal";
  for (const auto& [name, g] : plain) {
    ASSERT_TRUE(g.defined()) << what << ": plain path left " << name << " without a gradient";
    ASSERT_TRUE(ckpt.at(name).defined()) << what << ": checkpointed path left " << name << " without a gradient";
    double d = (g - ckpt.at(name)).abs().max().item<double>();
    double scale = g.abs().max().item<double>();
    if (d > worst) worst = d, worst_name = name;
    worst_rel = std::max(worst_rel, d / std::max(scale, 1e-30));
    EXPECT_LE(d, 1e-6 + 1e-5 * scale) << what << " " << name;
  }
  std::printf("  %s: loss plain %.7f checkpointed %.7f; %zu gradients, max |diff| %.3g (%s), max rel %.3g\n",
              what.c_str(), loss_plain, loss_ckpt, plain.size(), worst, worst_name.c_str(), worst_rel);
  EXPECT_NEAR(loss_plain, loss_ckpt, 1e-6 * std::abs(loss_plain) + 1e-6);
}

TEST(ActivationCheckpointing, GradientsEqualPlainPathPackedAndPadded) {
  at::set_num_threads(1);
  torch::manual_seed(0);
  auto m = Qwen2Model::from_config(small_config(64, 128, 3, 4, 2, 97), 7);
  m.set_requires_grad(true);
  auto ids = torch::randint(0, 97, {2, 24}, torch::kLong);
  // Packed: row 0 holds three documents and 2 padding tokens, row 1 two documents.
  expect_same_gradients("packed", m, {ids, {}, {}, {{10, 7, 5}, {16, 8}}});
  // Right padding: one batched causal attention (the "simple" path).
  auto right = torch::ones({2, 24}, torch::kLong);
  right[1].narrow(0, 17, 7).zero_();
  expect_same_gradients("right-padded", m, {ids, {}, right, {}});
  // Left padding: per-row segments, positions derived from the mask.
  auto left = torch::ones({2, 24}, torch::kLong);
  left[0].narrow(0, 0, 5).zero_();
  expect_same_gradients("left-padded", m, {ids, {}, left, {}});
}

TEST(ActivationCheckpointing, FrozenParametersAndNoGradMode) {
  at::set_num_threads(1);
  auto m = Qwen2Model::from_config(small_config(32, 64, 2, 4, 2, 50), 3);
  m.set_requires_grad(true);
  m.layers_[0].q_proj_w.set_requires_grad(false);  // a frozen weight gets no gradient either way
  auto ids = torch::randint(0, 50, {1, 12}, torch::kLong);
  ForwardOptions o;
  o.activation_checkpointing = true;
  auto out = m.forward({ids, {}, {}, {}}, o).logits;
  out.sum().backward();
  EXPECT_FALSE(m.layers_[0].q_proj_w.grad().defined());
  EXPECT_TRUE(m.layers_[0].k_proj_w.grad().defined());
  EXPECT_TRUE(m.embed_tokens_.grad().defined());
  // Under NoGradGuard the flag is ignored and the result is the plain forward's.
  torch::NoGradGuard ng;
  auto a = m.forward({ids, {}, {}, {}}, o).logits;
  o.activation_checkpointing = false;
  auto b = m.forward({ids, {}, {}, {}}, o).logits;
  EXPECT_TRUE(torch::equal(a, b));
}

// Peak RSS raised by one forward + backward (gradients freed between runs).
double peak_raise(Qwen2Model& m, const ForwardInput& in, bool checkpointed) {
  for (auto& [n, p] : m.named_parameters()) p.mutable_grad() = at::Tensor();
  runtime::reset_peak_rss();  // freed memory handed back first: "before" is live data only
  double before = static_cast<double>(runtime::current_rss_bytes());
  {
    ForwardOptions o;
    o.activation_checkpointing = checkpointed;
    o.logits = false;
    auto h = m.forward(in, o).hidden;  // (B, T, H); a cheap loss so the lm_head does not dominate
    (h * h).sum().backward();
  }
  double raised = static_cast<double>(runtime::peak_rss_bytes()) - before;
  return raised;
}

TEST(ActivationCheckpointing, LowersPeakMemory) {
  // Moderate shape: 6 layers of hidden 256 / intermediate 704, one row of 1024 tokens packed as
  // two 512-token documents. The plain path keeps every layer's intermediates (~30 MB a layer
  // here); checkpointing keeps 6 inputs (1 MB each) plus one layer's intermediates in backward.
  at::set_num_threads(1);
  // RSS tracks live tensors only if freed blocks leave the process: every block of 128 KiB and more
  // gets its own mapping (a fixed threshold also stops glibc's dynamic one, which after the first
  // large free serves blocks up to 32 MiB from a heap that fragments). Without it the heap's
  // fragmentation, which depends on the order LibTorch's kernels allocate in, shows up as peak RSS:
  // with torch 2.11 the checkpointed figure read 137 MB instead of 48.
  ASSERT_EQ(mallopt(M_MMAP_THRESHOLD, 128 << 10), 1);
  auto m = Qwen2Model::from_config(small_config(256, 704, 6, 4, 2, 256), 11);
  m.set_requires_grad(true);
  auto ids = torch::randint(0, 256, {1, 1024}, torch::kLong);
  ForwardInput in{ids, {}, {}, {{512, 512}}};
  peak_raise(m, in, true);  // warm-up: allocator and thread pools
  double ckpt = peak_raise(m, in, true);
  double plain = peak_raise(m, in, false);
  std::printf("  peak RSS raised by forward+backward: plain %.1f MB, checkpointed %.1f MB (%.2fx less)\n",
              plain / 1e6, ckpt / 1e6, plain / std::max(ckpt, 1.0));
  EXPECT_LT(ckpt, 0.5 * plain);
}

}  // namespace
}  // namespace ptk::model
