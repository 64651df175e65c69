// core/kernels: the ref/ kernels equal the cpu/ kernels (and SDPA, cuda/'s kernel, run on the CPU)
// on random float32 inputs, outputs and gradients; the dispatch picks what it should for each
// (device, dtype, options); the model's forward (padded with row_spans, packed, cached prefill and
// decode) and the lm_head op run on the `meta` device through the ref kernels; a linear adapter
// wraps one linear in both the training and the cached forward.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <memory>
#include <vector>

#include "core/config/sections.h"
#include "core/kernels/cpu/causal_attention.h"
#include "core/kernels/cpu/cpu_features.h"
#include "core/kernels/cpu/decode_attention_cpu.h"
#include "core/kernels/cpu/packed_linear.h"
#include "core/kernels/cuda/attention.h"
#include "core/kernels/dispatch.h"
#include "core/kernels/ref/attention.h"
#include "core/model/kv_cache.h"
#include "core/model/lm_head_logprobs.h"
#include "core/model/qwen2.h"
#include "core/util/error.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_qwen2.h"

namespace ptk {
namespace {

using kernels::Attention;

// Largest error relative to the largest reference value, or to `floor` when that is smaller (with
// one visible key the q and k gradients are exactly 0 and float32 rounding is ~1e-8).
double max_rel_err(const at::Tensor& got, const at::Tensor& want, double floor = 1e-2) {
  return ((got - want).abs().max() / want.abs().max().clamp_min(floor)).item<double>();
}

// ---- ref == cpu (and SDPA) for causal grouped-query attention ------------------------------------

struct Case {
  int64_t n, heads, kv, lq, lk, d;
};

using Kernel = std::function<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>;

// out and the q/k/v gradients of `kernel` vs ref::causal_attention, relative to the largest value.
void expect_equals_ref(const Case& c, const Kernel& kernel, const char* what) {
  SCOPED_TRACE(std::string(what) + " n=" + std::to_string(c.n) + " heads=" + std::to_string(c.heads) + " kv=" +
               std::to_string(c.kv) + " lq=" + std::to_string(c.lq) + " lk=" + std::to_string(c.lk));
  torch::manual_seed(c.lq * 17 + c.heads);
  auto q = torch::randn({c.n, c.heads, c.lq, c.d}), k = torch::randn({c.n, c.kv, c.lk, c.d}),
       v = torch::randn({c.n, c.kv, c.lk, c.d}), g = torch::randn({c.n, c.heads, c.lq, c.d});
  std::vector<at::Tensor> outs, grads;
  for (int which = 0; which < 2; ++which) {
    auto qq = q.clone().requires_grad_(true), kk = k.clone().requires_grad_(true), vv = v.clone().requires_grad_(true);
    auto o = which == 0 ? kernels::ref::causal_attention(qq, kk, vv) : kernel(qq, kk, vv);
    ASSERT_EQ(o.sizes(), q.sizes());
    (o * g).sum().backward();
    outs.push_back(o.detach());
    grads.insert(grads.end(), {qq.grad(), kk.grad(), vv.grad()});
  }
  EXPECT_LT(max_rel_err(outs[1], outs[0]), 2e-5) << "output";
  EXPECT_LT(max_rel_err(grads[3], grads[0]), 2e-5) << "dq";
  EXPECT_LT(max_rel_err(grads[4], grads[1]), 2e-5) << "dk";
  EXPECT_LT(max_rel_err(grads[5], grads[2]), 2e-5) << "dv";
}

const std::vector<Case>& cases() {
  static const std::vector<Case> c{{1, 2, 2, 1, 1, 16},   {2, 4, 2, 7, 7, 16},    {1, 14, 2, 33, 33, 64},
                                   {3, 6, 1, 50, 50, 32}, {1, 4, 2, 20, 29, 16},  {2, 7, 7, 130, 130, 16},
                                   {1, 8, 2, 64, 200, 32}};
  return c;
}

TEST(RefKernels, CausalAttentionEqualsCpuBlockAttention) {
  for (const auto& c : cases())
    expect_equals_ref(c, [](auto& q, auto& k, auto& v) { return kernels::cpu::causal_block_attention(q, k, v, 16); },
                      "cpu_block");
}

TEST(RefKernels, CausalAttentionEqualsCpuFlashAttention) {
  if (!kernels::cpu::cpu_has_avx512f()) PTK_SKIP_WITHOUT("avx512") << "no AVX-512F on this CPU";
  for (const auto& c : cases())
    expect_equals_ref(c, [](auto& q, auto& k, auto& v) { return kernels::cpu::causal_flash_attention(q, k, v, 12); },
                      "cpu_flash");
}

TEST(RefKernels, CausalAttentionEqualsSdpaWithGqa) {
  // cuda/'s SDPA call (enable_gqa, the bottom-right causal mask when Lq < Lk) on the CPU's math path.
  for (const auto& c : cases())
    expect_equals_ref(c, [](auto& q, auto& k, auto& v) { return kernels::cuda::sdpa_causal_attention(q, k, v); },
                      "sdpa");
}

TEST(RefKernels, PrefillAttentionEqualsCausalAttention) {
  torch::manual_seed(5);
  auto q = torch::randn({6, 9, 16}), k = torch::randn({2, 21, 16}), v = torch::randn({2, 21, 16});
  EXPECT_LT(max_rel_err(kernels::ref::prefill_attention(q, k, v), kernels::ref::causal_attention(q, k, v)), 2e-6);
}

TEST(RefKernels, DecodeAttentionEqualsCpuRows) {
  torch::manual_seed(11);
  const int64_t S = 9, nkv = 2, nh = 6, Tmax = 40, D = 32;
  auto K = torch::randn({S, nkv, Tmax, D}), V = torch::randn({S, nkv, Tmax, D});
  const std::vector<int64_t> slots{7, 2, 3, 0}, lens{1, 17, 40, 8};
  auto q = torch::randn({4, nh, D});
  // The per-row answer, from the training reference (query = the last of `len` positions).
  std::vector<at::Tensor> want;
  for (size_t r = 0; r < slots.size(); ++r)
    want.push_back(kernels::ref::causal_attention(q[r].unsqueeze(1), K[slots[r]].narrow(1, 0, lens[r]),
                                                  V[slots[r]].narrow(1, 0, lens[r]))
                       .squeeze(1));
  auto expected = torch::stack(want, 0);
  for (int force : {0, 1, 2}) {
    SCOPED_TRACE("force " + std::to_string(force));
    auto plan = kernels::ref::plan_decode(slots, lens, 40, at::kCPU, force);
    EXPECT_LT(max_rel_err(kernels::ref::decode_attention(q, K, V, plan), expected), 2e-6);
  }
  if (kernels::cpu::decode_attention_rows_supported(q, K))
    EXPECT_LT(max_rel_err(kernels::cpu::decode_attention_rows(q, K, V, slots, lens), expected), 2e-6);
}

TEST(RefKernels, LinearEqualsPackedLinear) {
  torch::manual_seed(2);
  for (int64_t n : {1, 47, 100}) {
    auto w = torch::randn({n, 40}), b = torch::randn({n});
    auto x = torch::randn({5, 40});
    auto want = kernels::ref::linear(x, w, b);
    EXPECT_LT(max_rel_err(want, torch::mm(x, w.t()) + b), 1e-6);
    if (!kernels::cpu::PackedLinear::supported(w)) continue;
    kernels::cpu::PackedLinear p(w);
    at::Tensor out;
    p.forward_out(x, out);
    EXPECT_LT(max_rel_err(out + b, want), 2e-6) << n;
  }
}

// ---- dispatch ---------------------------------------------------------------------------------------

kernels::AttentionCall call(c10::DeviceType dev, c10::ScalarType dt, bool packed, bool avx512 = true, int64_t d = 64) {
  return {dev, dt, d, packed, avx512};
}

TEST(Dispatch, PicksByDeviceAndDtype) {
  const kernels::Options a;  // all auto
  using c10::DeviceType;
  using c10::ScalarType;
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CPU, ScalarType::Float, false), a), Attention::kCpuFlash);
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CPU, ScalarType::Float, true), a), Attention::kCpuFlash);
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CPU, ScalarType::Float, false, false), a), Attention::kCpuBlock);
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CPU, ScalarType::Float, false, true, 24), a), Attention::kCpuBlock);
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CPU, ScalarType::BFloat16, false), a), Attention::kRef);
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CUDA, ScalarType::BFloat16, true), a), Attention::kFlashVarlen);
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CUDA, ScalarType::Half, true), a), Attention::kFlashVarlen);
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CUDA, ScalarType::BFloat16, false), a), Attention::kSdpa);
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CUDA, ScalarType::Float, true), a), Attention::kSdpa);
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CUDA, ScalarType::Float, false), a), Attention::kSdpa);
  EXPECT_EQ(kernels::select_attention(call(DeviceType::Meta, ScalarType::Float, true), a), Attention::kRef);
  EXPECT_EQ(kernels::select_attention(call(DeviceType::Meta, ScalarType::BFloat16, false), a), Attention::kRef);

  kernels::DecodeCall d{DeviceType::CPU, ScalarType::Float, true};
  EXPECT_EQ(kernels::select_decode_attention(d, a), kernels::DecodeAttention::kRows);
  d.rows_supported = false;
  EXPECT_EQ(kernels::select_decode_attention(d, a), kernels::DecodeAttention::kBatched);
  EXPECT_EQ(kernels::select_lm_head(true, a), kernels::LmHead::kCpuRows);
  EXPECT_EQ(kernels::select_lm_head(false, a), kernels::LmHead::kRef);
  EXPECT_EQ(kernels::select_packed_attention(a), kernels::PackedAttention::kBatched);
  EXPECT_TRUE(kernels::sparse_embedding_grad(DeviceType::CPU));
  EXPECT_FALSE(kernels::sparse_embedding_grad(DeviceType::CUDA));
  EXPECT_FALSE(kernels::sparse_embedding_grad(DeviceType::Meta));
  EXPECT_EQ(kernels::attention_block_rows(a), 128);

  // An env alias (PTK_ATTENTION_BLOCK_ROWS=0 -> ref) speaks of the CPU: other devices stay auto.
  kernels::Options env_ref;
  env_ref.attention = Attention::kRef;
  env_ref.attention_cpu_only = true;
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CPU, ScalarType::Float, false), env_ref), Attention::kRef);
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CUDA, ScalarType::BFloat16, true), env_ref),
            Attention::kFlashVarlen);
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CUDA, ScalarType::Float, false), env_ref), Attention::kSdpa);
  // The recipe's choice applies everywhere.
  kernels::Options recipe;
  recipe.attention = Attention::kRef;
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CUDA, ScalarType::BFloat16, true), recipe), Attention::kRef);
}

TEST(Dispatch, ForcedKernelsFallBackWhereTheyCannotServe) {
  using c10::DeviceType;
  using c10::ScalarType;
  kernels::Options o;
  o.attention = Attention::kFlashVarlen;  // CPU: auto's choice
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CPU, ScalarType::Float, true), o), Attention::kCpuFlash);
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CUDA, ScalarType::Float, true), o), Attention::kSdpa);
  o.attention = Attention::kCpuFlash;
  EXPECT_EQ(kernels::select_attention(call(DeviceType::Meta, ScalarType::Float, false), o), Attention::kRef);
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CUDA, ScalarType::BFloat16, true), o), Attention::kFlashVarlen);
  o.attention = Attention::kCpuBlock;  // PTK_ATTENTION_FLASH=0
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CPU, ScalarType::Float, false), o), Attention::kCpuBlock);
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CPU, ScalarType::BFloat16, false), o), Attention::kRef);
  o.attention = Attention::kRef;
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CUDA, ScalarType::BFloat16, true), o), Attention::kRef);
  o.attention = Attention::kSdpa;
  EXPECT_EQ(kernels::select_attention(call(DeviceType::CPU, ScalarType::Float, false), o), Attention::kSdpa);
  o.decode_attention = kernels::DecodeAttention::kGather;
  EXPECT_EQ(kernels::select_decode_attention({DeviceType::CPU, ScalarType::Float, true}, o),
            kernels::DecodeAttention::kGather);
  o.decode_attention = kernels::DecodeAttention::kRows;  // rows where they serve, else batched
  EXPECT_EQ(kernels::select_decode_attention({DeviceType::CUDA, ScalarType::BFloat16, false}, o),
            kernels::DecodeAttention::kBatched);
  o.lm_head = kernels::LmHead::kRef;
  EXPECT_EQ(kernels::select_lm_head(true, o), kernels::LmHead::kRef);
  o.attention_block_rows = 32;
  EXPECT_EQ(kernels::attention_block_rows(o), 32);
}

TEST(Dispatch, RecipeSectionParsesAndConfigures) {
  config::KernelsSection s;
  s.attention = "cpu_block";
  s.attention_block_rows = 64;
  s.packed_attention = "per_document";
  s.decode_attention = "window";
  s.lm_head = "ref";
  auto o = kernels::options_from(s);
  EXPECT_EQ(o.attention, Attention::kCpuBlock);
  EXPECT_EQ(o.attention_block_rows, 64);
  EXPECT_EQ(o.packed_attention, kernels::PackedAttention::kPerDocument);
  EXPECT_EQ(o.decode_attention, kernels::DecodeAttention::kWindow);
  EXPECT_EQ(o.lm_head, kernels::LmHead::kRef);
  for (const auto& n : kernels::attention_names())
    EXPECT_EQ(kernels::name(kernels::parse_options(n, 0, "auto", "auto", "auto").attention), n);
  try {
    kernels::parse_options("flash", 0, "auto", "auto", "auto");
    ADD_FAILURE() << "no error for an unknown kernel";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("kernels.attention"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("cpu_flash"), std::string::npos) << e.what();
  }
  {
    kernels::ScopedOptions restore(kernels::options());  // configure() is process-wide: put it back after
    kernels::configure(o);
    EXPECT_EQ(kernels::options().attention, Attention::kCpuBlock);
    EXPECT_EQ(kernels::options().decode_attention, kernels::DecodeAttention::kWindow);
    kernels::configure(kernels::Options{});  // auto everywhere: the environment aliases
    EXPECT_EQ(kernels::options().attention, kernels::env_options().attention);
  }
}

// ---- the model on the meta device -----------------------------------------------------------------

TEST(MetaDevice, ForwardPaddedPackedAndCachedRunThroughRefKernels) {
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    SCOPED_TRACE(c10::toString(dtype));
    model::LoadOptions lo;
    lo.device = at::kMeta;
    lo.dtype = dtype;
    auto m = model::Qwen2Model::from_config(test::small_qwen2_config(), 1, lo);
    ASSERT_TRUE(m.embed_tokens_.is_meta());
    m.set_requires_grad(true);
    const int64_t B = 3, T = 12;
    // Padded rows, planned from row_spans (the mask is never read back).
    model::ForwardInput in;
    in.input_ids = at::zeros({B, T}, at::TensorOptions().dtype(at::kLong).device(at::kMeta));
    in.attention_mask = at::ones({B, T}, at::TensorOptions().dtype(at::kLong).device(at::kMeta));
    in.row_spans = {{0, 12}, {3, 9}, {0, 5}};
    model::ForwardOptions fo;
    fo.logits = false;
    auto out = m.forward(in, fo);
    EXPECT_TRUE(out.hidden.is_meta());
    EXPECT_EQ(out.hidden.sizes().vec(), (std::vector<int64_t>{B, T, 64}));
    // The lm_head op (bf16: in the weight's dtype, no fp32 copy) and backward, all on meta.
    auto h = out.hidden.reshape({B * T, 64});
    auto targets = at::zeros({B * T}, at::TensorOptions().dtype(at::kLong).device(at::kMeta));
    auto lp = model::lm_head_logprobs(h, m.lm_head_weight(), targets);
    EXPECT_TRUE(lp.logprobs.is_meta());
    lp.logprobs.sum().backward();
    EXPECT_TRUE(m.embed_tokens_.grad().is_meta());
    EXPECT_FALSE(m.embed_tokens_.grad().is_sparse());  // dense tied-embedding gradient off the CPU
    // Packed rows, with activation checkpointing.
    model::ForwardInput packed;
    packed.input_ids = in.input_ids;
    packed.doc_lengths = {{5, 7}, {2, 2, 2, 3}, {12}};
    fo.activation_checkpointing = true;
    auto po = m.forward(packed, fo);
    EXPECT_EQ(po.hidden.sizes().vec(), (std::vector<int64_t>{B, T, 64}));
    po.hidden.sum().backward();
    // Cached prefill, then one decode step.
    at::NoGradGuard no_grad;
    model::KVCache cache(m.config(), 4, 32, dtype, at::kMeta);
    auto ids = at::zeros({2, 6}, at::TensorOptions().dtype(at::kLong).device(at::kMeta));
    auto logits = m.forward_cached(ids, {1, 3}, {6, 4}, cache);
    EXPECT_EQ(logits.sizes().vec(), (std::vector<int64_t>{2, 97}));
    auto step = m.forward_cached(ids.narrow(1, 0, 1), {1, 3}, {1, 1}, cache);
    EXPECT_TRUE(step.is_meta());
    EXPECT_EQ(cache.length(1), 7);
    EXPECT_EQ(cache.length(3), 5);
  }
}

// ---- a linear adapter wraps one linear ------------------------------------------------------------

// base + x D^T: the same as adding D to the weight.
struct DeltaAdapter : model::LinearAdapter {
  at::Tensor delta;
  at::Tensor forward(const at::Tensor& x, const at::Tensor& base) const override {
    return base + at::linear(x, delta);
  }
};

TEST(LinearAdapter, WrapsOneLinearInTrainingAndCachedForwards) {
  at::NoGradGuard no_grad;
  auto m = model::Qwen2Model::from_config(test::small_qwen2_config(), 3);
  auto edited = m.clone();
  torch::manual_seed(4);
  auto adapter = std::make_shared<DeltaAdapter>();
  adapter->delta = torch::randn({96, 64}) * 0.05;
  edited.layers_[1].up_proj_w += adapter->delta;
  m.set_adapter(1, model::LinearId::kUp, adapter);
  EXPECT_EQ(m.adapter(1, model::LinearId::kUp), adapter.get());
  EXPECT_EQ(m.adapter(0, model::LinearId::kUp), nullptr);
  EXPECT_STREQ(model::linear_name(model::LinearId::kUp), "mlp.up_proj");

  model::ForwardInput in;
  in.input_ids = torch::randint(0, 97, {2, 10});
  in.doc_lengths = {{4, 6}, {10}};
  auto want = edited.forward(in).logits, got = m.forward(in).logits;
  EXPECT_LT(max_rel_err(got, want), 1e-5);

  model::KVCache c1(m.config(), 2, 16, at::kFloat, at::kCPU), c2(m.config(), 2, 16, at::kFloat, at::kCPU);
  auto ids = in.input_ids.narrow(1, 0, 5);
  EXPECT_LT(max_rel_err(m.forward_cached(ids, {0, 1}, {5, 5}, c1), edited.forward_cached(ids, {0, 1}, {5, 5}, c2)),
            1e-5);
  auto next = in.input_ids.narrow(1, 5, 1);
  EXPECT_LT(max_rel_err(m.forward_cached(next, {0, 1}, {1, 1}, c1), edited.forward_cached(next, {0, 1}, {1, 1}, c2)),
            1e-5);
  m.set_adapter(1, model::LinearId::kUp, nullptr);
  EXPECT_EQ(m.adapter(1, model::LinearId::kUp), nullptr);
}

}  // namespace
}  // namespace ptk
