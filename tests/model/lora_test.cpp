// LoRA on Qwen2Model (core/model/lora.h) against its definition on a small random model: the adapted
// forward equals the forward of the merged weights (training and cached forwards); zero-init B leaves
// the logits unchanged; A's and B's gradients equal central finite differences; activation
// checkpointing gives the plain path's gradients, dropout included; the PEFT folder round-trips and
// loads through Qwen2Model::from_pretrained; the reference (adapters off) is the base. PEFT itself is
// the reference in tests/reference/lora_reference_test.py.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>

#include "core/checkpoint/adapter_config.h"
#include "core/model/kv_cache.h"
#include "core/model/lora.h"
#include "core/model/packed_linear.h"
#include "core/model/qwen2.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_qwen2.h"

namespace ptk::model {
namespace {

double max_rel_err(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>() / std::max(b.abs().max().item<double>(), 1e-30);
}

// B drawn away from zero, so that the adapters change the output.
void randomize_b(const Lora& L, double scale = 0.05) {
  at::NoGradGuard ng;
  for (auto& [name, t] : L.named_parameters())
    if (name.find("lora_B") != std::string::npos) t.copy_(torch::randn(t.sizes()) * scale);
}

ForwardInput packed_input(int64_t vocab) {
  ForwardInput in;
  in.input_ids = torch::randint(0, vocab, {2, 12});
  in.doc_lengths = {{5, 7}, {12}};
  return in;
}

TEST(Lora, ZeroInitBLeavesLogitsUnchanged) {
  torch::manual_seed(0);
  auto base = Qwen2Model::from_config(test::small_qwen2_config(), 3);
  auto m = base;
  LoraOptions o;
  o.rank = 4;
  Lora L = Lora::attach(m, o, 11);
  EXPECT_TRUE(m.has_adapters());
  EXPECT_FALSE(base.has_adapters());  // the copy it was made from keeps none
  // 2 layers x 7 linears, A and B each.
  EXPECT_EQ(L.named_parameters().size(), 28u);
  at::NoGradGuard ng;
  auto in = packed_input(97);
  EXPECT_TRUE(torch::equal(m.forward(in).logits, base.forward(in).logits));
  // A is PEFT's Kaiming-uniform: within +-1/sqrt(in); B is zero.
  for (auto& [name, t] : L.named_parameters()) {
    if (name.find("lora_B") != std::string::npos) {
      EXPECT_EQ(t.abs().max().item<double>(), 0.0) << name;
    } else {
      EXPECT_LE(t.abs().max().item<double>(), 1.0 / std::sqrt(static_cast<double>(t.size(1))) + 1e-7) << name;
      EXPECT_GT(t.abs().max().item<double>(), 0.5 / std::sqrt(static_cast<double>(t.size(1)))) << name;
    }
  }
  EXPECT_EQ(L.named_parameters().front().first, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
}

TEST(Lora, AdaptedForwardEqualsMergedWeights) {
  torch::manual_seed(1);
  for (bool rslora : {false, true}) {
    auto m = Qwen2Model::from_config(test::small_qwen2_config(false), 5);
    LoraOptions o;
    o.rank = 3;
    o.alpha = 7;
    o.rslora = rslora;
    o.targets = {"q_proj", "v_proj", "down_proj"};
    Lora L = Lora::attach(m, o, 2);
    EXPECT_DOUBLE_EQ(L.config().scaling(), rslora ? 7 / std::sqrt(3.0) : 7 / 3.0);
    EXPECT_EQ(L.named_parameters().size(), 12u);  // 2 layers x 3 linears x (A, B)
    EXPECT_EQ(m.adapter(0, LinearId::kK), nullptr);
    randomize_b(L);
    auto merged = L.merged(m);
    EXPECT_FALSE(merged.has_adapters());
    at::NoGradGuard ng;
    auto in = packed_input(97);
    auto got = m.forward(in).logits, want = merged.forward(in).logits;
    EXPECT_LT(max_rel_err(got, want), 1e-5) << "rslora " << rslora;
    EXPECT_GT(max_rel_err(got, L.base_of(m).forward(in).logits), 1e-3) << "the adapters change nothing";
    // Cached forward (the rollout path): prefill, then one decode step.
    KVCache c1(m.config(), 2, 16, at::kFloat, at::kCPU), c2(m.config(), 2, 16, at::kFloat, at::kCPU);
    auto ids = in.input_ids.narrow(1, 0, 6);
    EXPECT_LT(max_rel_err(m.forward_cached(ids, {0, 1}, {6, 6}, c1), merged.forward_cached(ids, {0, 1}, {6, 6}, c2)),
              1e-5);
    // The decode step also through the CPU's packed copies of the (frozen) base weights, where they
    // serve: the adapters apply on top of the packed GEMM, so the copies never go stale under LoRA.
    KVCache c3(m.config(), 2, 16, at::kFloat, at::kCPU);
    m.forward_cached(ids, {0, 1}, {6, 6}, c3);
    const auto packed = m.pack_for_decode(true, int64_t{1} << 30);
    // Packed wherever PackedLinear serves (AVX-512 float32); elsewhere this repeats the check above.
    EXPECT_EQ(packed.layers.size(), kernels::cpu::PackedLinear::supported(m.layers_[0].q_proj_w) ? 2u : 0u);
    auto next = in.input_ids.narrow(1, 6, 1);
    const auto want_next = merged.forward_cached(next, {0, 1}, {1, 1}, c2);
    EXPECT_LT(max_rel_err(m.forward_cached(next, {0, 1}, {1, 1}, c1), want_next), 1e-5);
    EXPECT_LT(max_rel_err(m.forward_cached(next, {0, 1}, {1, 1}, c3, AttentionBackend::kAuto, nullptr, &packed), want_next),
              1e-5);
  }
}

TEST(Lora, BaseOfSwitchesAdaptersOffWithoutCopying) {
  torch::manual_seed(2);
  auto base = Qwen2Model::from_config(test::small_qwen2_config(), 5);
  base.add_score_head(9, 0);
  auto m = base;
  LoraOptions o;
  o.rank = 2;
  o.modules_to_save = {"score"};
  o.task_type = "SEQ_CLS";
  Lora L = Lora::attach(m, o, 3);
  randomize_b(L);
  {
    at::NoGradGuard ng;
    m.score_.add_(1.0);  // the trained copy moves; the original stays
  }
  auto off = L.base_of(m);
  EXPECT_FALSE(off.has_adapters());
  EXPECT_TRUE(off.layers_[0].q_proj_w.is_same(m.layers_[0].q_proj_w));  // shared, not copied
  EXPECT_TRUE(off.score_.is_same(base.score_));
  EXPECT_FALSE(m.score_.is_same(base.score_));
  at::NoGradGuard ng;
  auto in = packed_input(97);
  EXPECT_TRUE(torch::equal(off.forward(in, {false}).hidden, base.forward(in, {false}).hidden));
  EXPECT_EQ(L.named_parameters().back().first, "base_model.model.score.weight");
}

// A scalar loss that weights every logit differently.
at::Tensor weighted_loss(const Qwen2Model& m, const ForwardInput& in, const at::Tensor& w, bool checkpointed = false) {
  ForwardOptions fo;
  fo.activation_checkpointing = checkpointed;
  return (at::log_softmax(m.forward(in, fo).logits, -1) * w).sum();
}

TEST(Lora, GradientsOfAAndBMatchFiniteDifferences) {
  // One adapted linear in float64 (the model computes its norms and RoPE tables in float32, too
  // coarse for central differences): y = x Wᵀ + b + s·x Aᵀ Bᵀ, loss = Σ y ⊙ w.
  torch::manual_seed(3);
  auto opts = torch::TensorOptions().dtype(torch::kDouble);
  auto x = torch::randn({5, 6}, opts), W = torch::randn({4, 6}, opts), bias = torch::randn({4}, opts);
  auto a = torch::randn({3, 6}, opts).requires_grad_(), b = torch::randn({4, 3}, opts).requires_grad_();
  auto w = torch::randn({5, 4}, opts);
  LoraLinear lin(a, b, /*scaling=*/0.7, /*dropout=*/0);
  auto loss = [&] { return (lin.forward(x, at::linear(x, W, bias)) * w).sum(); };
  loss().backward();
  const double h = 1e-6;
  int checked = 0;
  for (at::Tensor t : {a, b}) {
    auto g = t.grad().clone();
    for (int64_t i = 0; i < t.numel(); ++i) {
      at::NoGradGuard ng;
      auto v = t.view(-1);
      const double x0 = v[i].item<double>();
      v[i] = x0 + h;
      const double up = loss().item<double>();
      v[i] = x0 - h;
      const double down = loss().item<double>();
      v[i] = x0;
      EXPECT_NEAR(g.view(-1)[i].item<double>(), (up - down) / (2 * h), 1e-7) << (checked < 18 ? "A" : "B") << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_EQ(checked, 18 + 12);
}

TEST(Lora, ModelGradientsOfAAndBFollowTheMergedWeightsGradient) {
  // In the whole model: with G = dL/dW of the merged model (W' = W + s·B A), dL/dB = s·G Aᵀ and
  // dL/dA = s·Bᵀ G, for every adapted linear.
  torch::manual_seed(3);
  auto m = Qwen2Model::from_config(test::small_qwen2_config(), 6);
  m.set_requires_grad(false);
  LoraOptions o;
  o.rank = 2;
  o.alpha = 4;
  o.targets = {"k_proj", "o_proj", "up_proj"};
  Lora L = Lora::attach(m, o, 4);
  randomize_b(L, 0.2);
  for (auto& [n, t] : L.named_parameters()) t.set_requires_grad(true);
  auto merged = L.merged(m).clone();  // its own tensors: requires_grad must not reach m's frozen base
  merged.set_requires_grad(true);
  auto in = packed_input(97);
  auto w = torch::randn({2, 12, 97});
  (at::log_softmax(m.forward(in).logits, -1) * w).sum().backward();
  (at::log_softmax(merged.forward(in).logits, -1) * w).sum().backward();
  for (auto& [n, t] : m.named_parameters()) EXPECT_FALSE(t.grad().defined()) << n << ": the base is frozen";
  const double s = L.config().scaling();
  int checked = 0;
  for (int64_t layer = 0; layer < 2; ++layer) {
    for (auto [id, G] : {std::pair{LinearId::kK, merged.layers_[layer].k_proj_w.grad()},
                         std::pair{LinearId::kO, merged.layers_[layer].o_proj_w.grad()},
                         std::pair{LinearId::kUp, merged.layers_[layer].up_proj_w.grad()}}) {
      auto* ad = dynamic_cast<const LoraLinear*>(m.adapter(layer, id));
      ASSERT_NE(ad, nullptr);
      EXPECT_LT(max_rel_err(ad->b().grad(), s * at::mm(G, ad->a().detach().t())), 1e-4) << layer << " " << linear_name(id);
      EXPECT_LT(max_rel_err(ad->a().grad(), s * at::mm(ad->b().detach().t(), G)), 1e-4) << layer << " " << linear_name(id);
      ++checked;
    }
  }
  EXPECT_EQ(checked, 6);
}

TEST(Lora, ActivationCheckpointingGivesThePlainGradientsDropoutIncluded) {
  torch::manual_seed(4);
  for (double dropout : {0.0, 0.3}) {
    auto m = Qwen2Model::from_config(test::small_qwen2_config(), 8);
    m.set_requires_grad(false);
    LoraOptions o;
    o.rank = 4;
    o.dropout = dropout;
    Lora L = Lora::attach(m, o, 5);
    randomize_b(L, 0.1);
    for (auto& [n, t] : L.named_parameters()) t.set_requires_grad(true);
    auto in = packed_input(97);
    auto w = torch::randn({2, 12, 97});
    auto grads = [&](bool checkpointed) {
      for (auto& [n, t] : L.named_parameters()) t.mutable_grad() = at::Tensor();
      torch::manual_seed(42);  // the same dropout masks for both paths
      weighted_loss(m, in, w, checkpointed).backward();
      std::vector<at::Tensor> g;
      for (auto& [n, t] : L.named_parameters()) {
        EXPECT_TRUE(t.grad().defined()) << n << (checkpointed ? " (checkpointed)" : "");
        g.push_back(t.grad().defined() ? t.grad().clone() : at::zeros_like(t));
      }
      return g;
    };
    auto plain = grads(false), ckpt = grads(true);
    for (size_t i = 0; i < plain.size(); ++i)
      EXPECT_LT(max_rel_err(ckpt[i], plain[i]), 1e-5) << L.named_parameters()[i].first << " dropout " << dropout;
    if (dropout > 0) {
      // Dropout really draws: another seed gives other gradients.
      for (auto& [n, t] : L.named_parameters()) t.mutable_grad() = at::Tensor();
      torch::manual_seed(43);
      weighted_loss(m, in, w).backward();
      EXPECT_GT(max_rel_err(L.named_parameters()[1].second.grad(), plain[1]), 1e-3);
    }
  }
}

TEST(Lora, SavedFolderLoadsBackAndThroughFromPretrained) {
  test::TempDir tmp;
  torch::manual_seed(5);
  auto base = Qwen2Model::from_config(test::small_qwen2_config(false), 7);
  const std::string base_dir = tmp.path() + "/base", adapter_dir = tmp.path() + "/adapter";
  base.save_pretrained(base_dir);
  auto m = base;
  LoraOptions o;
  o.rank = 4;
  o.alpha = 8;
  o.targets = {"q_proj", "gate_proj"};
  o.modules_to_save = {"lm_head"};
  Lora L = Lora::attach(m, o, 6);
  randomize_b(L);
  {
    at::NoGradGuard ng;
    m.lm_head_.mul_(1.5);
  }
  L.set_base_model(base_dir);
  L.save(adapter_dir, {});
  ASSERT_TRUE(checkpoint::is_adapter_folder(adapter_dir));
  auto cfg = checkpoint::read_adapter_config(adapter_dir);
  EXPECT_EQ(cfg.r, 4);
  EXPECT_EQ(cfg.base_model, base_dir);
  EXPECT_EQ(cfg.target_modules, (std::vector<std::string>{"q_proj", "gate_proj"}));
  EXPECT_EQ(cfg.modules_to_save, std::vector<std::string>{"lm_head"});
  EXPECT_EQ(checkpoint::model_root_dir(adapter_dir), base_dir);
  EXPECT_EQ(checkpoint::read_config(adapter_dir).hidden_size, 64);  // the base's config.json

  at::NoGradGuard ng;
  auto in = packed_input(97);
  auto want = m.forward(in).logits;
  auto fresh = Qwen2Model::from_pretrained(base_dir);
  Lora back = Lora::load(fresh, adapter_dir);
  EXPECT_LT(max_rel_err(fresh.forward(in).logits, want), 1e-6);
  EXPECT_EQ(back.named_parameters().size(), L.named_parameters().size());
  auto merged = Qwen2Model::from_pretrained(adapter_dir);
  EXPECT_FALSE(merged.has_adapters());
  EXPECT_LT(max_rel_err(merged.forward(in).logits, want), 1e-5);
}

TEST(Lora, RefusesWhatItCannotLoad) {
  test::TempDir tmp;
  auto m = Qwen2Model::from_config(test::small_qwen2_config(), 7);
  LoraOptions o;
  o.targets = {"qkv_proj"};
  EXPECT_THROW(Lora::attach(m, o, 1), Error);
  o.targets = {"all-linear"};
  o.modules_to_save = {"embed_tokens"};  // tied: its copy would not reach the output layer
  EXPECT_THROW(Lora::attach(m, o, 1), Error);
  o.modules_to_save = {};
  Lora L = Lora::attach(m, o, 1);
  EXPECT_THROW(Lora::attach(m, o, 1), Error);  // adapters already there
  EXPECT_FALSE(m.clone().has_adapters());    // a deep copy does not share adapter tensors

  auto parse = [](const std::string& extra) {
    return checkpoint::parse_adapter_config(
        "{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 16, \"target_modules\": [\"q_proj\"]" + extra + "}", "t.json");
  };
  EXPECT_NO_THROW(parse(""));
  EXPECT_THROW(parse(", \"use_dora\": true"), Error);
  EXPECT_THROW(parse(", \"bias\": \"all\""), Error);
  EXPECT_THROW(parse(", \"rank_pattern\": {\"q_proj\": 4}"), Error);
  EXPECT_THROW(parse(", \"layers_to_transform\": [0]"), Error);
  EXPECT_THROW(parse(", \"task_type\": \"SEQ_2_SEQ_LM\""), Error);
  // PEFT's string form is a regular expression over the whole module name.
  auto rx = checkpoint::parse_adapter_config(
      "{\"r\": 2, \"target_modules\": \".*\\\\.(q_proj|v_proj)\"}", "t.json");
  EXPECT_TRUE(rx.targets("model.layers.1.self_attn.q_proj"));
  EXPECT_FALSE(rx.targets("model.layers.1.self_attn.k_proj"));
  auto names = parse("");
  EXPECT_TRUE(names.targets("model.layers.0.self_attn.q_proj"));
  EXPECT_FALSE(names.targets("model.layers.0.self_attn.xq_proj"));
  // What ptk writes, it reads back.
  auto c = L.config();
  c.base_model = "/models/base";
  auto again = checkpoint::parse_adapter_config(checkpoint::adapter_config_json(c), "again.json");
  EXPECT_EQ(again.r, c.r);
  EXPECT_EQ(again.lora_alpha, c.lora_alpha);
  EXPECT_EQ(again.target_modules, c.target_modules);
  EXPECT_EQ(again.base_model, "/models/base");

  // A tensor missing from the file, or one too many, is refused by name.
  L.set_base_model(tmp.path() + "/nowhere");
  L.save(tmp.path() + "/a", {});
  auto other = Qwen2Model::from_config(test::small_qwen2_config(), 7);
  auto cfg_text = read_file(tmp.path() + "/a/adapter_config.json");
  write_file_atomic(tmp.path() + "/a/adapter_config.json",
                    std::string(cfg_text).replace(cfg_text.find("\"r\": 16"), 7, "\"r\": 8"));
  EXPECT_THROW(Lora::load(other, tmp.path() + "/a"), Error);
  EXPECT_THROW(Qwen2Model::from_pretrained(tmp.path() + "/a"), Error);  // base folder missing
}

}  // namespace
}  // namespace ptk::model
