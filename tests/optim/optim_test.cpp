// AdamW against torch.optim.AdamW's recorded step (HF fixture), fused vs reference path, bf16
// master weights, schedules, clipping and the NaN guard.
#include <gtest/gtest.h>
#include <rapidjson/document.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>

#include "core/optim/adamw.h"
#include "core/optim/clip.h"
#include "core/optim/schedule.h"
#include "core/util/error.h"
#include "core/util/json.h"
#include "tests/support/test_util.h"

namespace ptk::optim {
namespace {

// expected.json's "adamw" samples: for each parameter, elements (before, grad, after) of one step of
// torch.optim.AdamW(lr 1e-3, betas (0.9, 0.95), eps 1e-8, weight_decay 0.1, decay on every tensor).
TEST(AdamW, MatchesTorchAdamWFixtureSamples) {
  std::string path = test::source_dir() + "/tests/fixtures/hf-qwen2/tiny-tied/expected.json";
  if (!std::filesystem::exists(path)) {
    std::string shared = test::shared_dir();
    if (shared.empty()) PTK_SKIP_WITHOUT("shared") << "no expected.json in tests/fixtures or ../shared";
    path = shared + "/fixtures/hf-qwen2/tiny-tied/expected.json";
  }
  auto doc = json::parse_file(path);
  const auto& adamw = doc["adamw"];
  const auto& hp = adamw["hyperparameters"];
  AdamWOptions opt;
  opt.beta1 = hp["betas"][0].GetDouble();
  opt.beta2 = hp["betas"][1].GetDouble();
  opt.eps = hp["eps"].GetDouble();
  opt.weight_decay = hp["weight_decay"].GetDouble();
  opt.decay_norms_and_biases = true;  // the fixture used one param group
  double lr = hp["lr"].GetDouble();
  int checked = 0;
  for (bool fused : {true, false}) {
    for (auto it = adamw["samples"].MemberBegin(); it != adamw["samples"].MemberEnd(); ++it) {
      const auto& s = it->value;
      std::vector<float> before, grad, after;
      for (auto& x : s["before"].GetArray()) before.push_back(x.GetFloat());
      for (auto& x : s["grad"].GetArray()) grad.push_back(x.GetFloat());
      for (auto& x : s["after"].GetArray()) after.push_back(x.GetFloat());
      auto p = torch::tensor(before).set_requires_grad(true);
      p.mutable_grad() = torch::tensor(grad);
      AdamW a({{it->name.GetString(), p}}, opt);
      a.set_fused(fused);
      a.step(lr);
      for (size_t i = 0; i < after.size(); ++i) {
        EXPECT_NEAR(p[i].item<float>(), after[i], 1e-6) << it->name.GetString() << "[" << i << "] fused=" << fused;
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 0);
}

TEST(AdamW, FusedEqualsReferenceOverSteps) {
  torch::manual_seed(0);
  auto w0 = torch::randn({257, 33});
  AdamWOptions opt{0.9, 0.95, 1e-8, 0.1, false};
  auto a = w0.clone().set_requires_grad(true);
  auto b = w0.clone().set_requires_grad(true);
  AdamW fa({{"layer.weight", a}}, opt), fb({{"layer.weight", b}}, opt);
  fb.set_fused(false);
  for (int step = 0; step < 5; ++step) {
    auto g = torch::randn({257, 33});
    a.mutable_grad() = g.clone();
    b.mutable_grad() = g.clone();
    fa.step(1e-2);
    fb.step(1e-2);
  }
  double diff = (a - b).abs().max().item<double>();
  EXPECT_LT(diff, 1e-6) << "max |fused - reference| = " << diff;
}

// The fused kernel is compiled without errno semantics so that it vectorises; its results must be
// the same bits as the same arithmetic done one float at a time here (ordinary flags). 100,003
// elements: several parallel ranges and a vector remainder.
TEST(AdamW, FusedKernelBitwiseEqualsScalarLoop) {
  torch::manual_seed(1);
  const int64_t n = 100003;
  AdamWOptions opt{0.9, 0.95, 1e-8, 0.1, false};
  auto w = torch::randn({n}).set_requires_grad(true);
  auto p = w.detach().clone();
  auto m = torch::zeros({n}), v = torch::zeros({n});
  AdamW fa({{"layer.weight", w}}, opt);
  const double lr = 1e-2;
  for (int step = 1; step <= 3; ++step) {
    auto g = torch::randn({n}) * (step == 2 ? 1e-3 : 1.0);
    w.mutable_grad() = g.clone();
    fa.step(lr);
    const double bc1 = 1.0 - std::pow(opt.beta1, step), bc2 = 1.0 - std::pow(opt.beta2, step);
    const float decay_mul = static_cast<float>(1.0 - lr * opt.weight_decay);
    const float one_minus_b1 = static_cast<float>(1.0 - opt.beta1), b2 = static_cast<float>(opt.beta2);
    const float one_minus_b2 = static_cast<float>(1.0 - opt.beta2), bc2_sqrt = static_cast<float>(std::sqrt(bc2));
    const float eps = static_cast<float>(opt.eps), neg_step_size = static_cast<float>(-lr / bc1);
    float *pp = p.data_ptr<float>(), *mm = m.data_ptr<float>(), *vv = v.data_ptr<float>();
    const float* gg = g.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      float pi = pp[i] * decay_mul;
      float mi = mm[i] + one_minus_b1 * (gg[i] - mm[i]);
      float vi = vv[i] * b2 + one_minus_b2 * gg[i] * gg[i];
      float denom = std::sqrt(vi) / bc2_sqrt + eps;
      pp[i] = pi + neg_step_size * (mi / denom);
      mm[i] = mi;
      vv[i] = vi;
    }
    ASSERT_TRUE(torch::equal(w.detach(), p)) << "step " << step << ": max |fused - scalar| = "
                                             << (w.detach() - p).abs().max().item<double>();
  }
}

TEST(AdamW, NoDecayForBiasesAndNorms) {
  EXPECT_TRUE(is_no_decay("model.layers.0.self_attn.q_proj.bias"));
  EXPECT_TRUE(is_no_decay("model.layers.3.input_layernorm.weight"));
  EXPECT_TRUE(is_no_decay("model.norm.weight"));
  EXPECT_FALSE(is_no_decay("model.layers.0.mlp.down_proj.weight"));
  EXPECT_FALSE(is_no_decay("model.embed_tokens.weight"));
  // With zero gradient only decay moves a weight: biases stay put.
  auto w = torch::ones({4}).set_requires_grad(true);
  auto bias = torch::ones({4}).set_requires_grad(true);
  w.mutable_grad() = torch::zeros({4});
  bias.mutable_grad() = torch::zeros({4});
  AdamW a({{"x.weight", w}, {"x.bias", bias}}, AdamWOptions{0.9, 0.999, 1e-8, 0.5, false});
  a.step(0.1);
  EXPECT_FLOAT_EQ(w[0].item<float>(), 1.0f - 0.1f * 0.5f);
  EXPECT_FLOAT_EQ(bias[0].item<float>(), 1.0f);
}

// bf16 parameters keep fp32 master weights: a few steps track the fp32 run to bf16 precision,
// and the fp32 master itself tracks it closely.
TEST(AdamW, Bf16MasterWeightsTrackFp32) {
  torch::manual_seed(1);
  auto w0 = torch::randn({64, 16});
  auto x = torch::randn({32, 64});
  auto y = torch::randn({32, 16});
  auto p32 = w0.clone().set_requires_grad(true);
  auto p16 = w0.to(torch::kBFloat16).set_requires_grad(true);
  AdamWOptions opt{0.9, 0.95, 1e-8, 0.01, false};
  AdamW a32({{"w.weight", p32}}, opt), a16({{"w.weight", p16}}, opt);
  for (int step = 0; step < 5; ++step) {
    torch::mse_loss(torch::mm(x, p32), y).backward();
    torch::mse_loss(torch::mm(x.to(torch::kBFloat16), p16).to(torch::kFloat32), y).backward();
    a32.step(1e-2);
    a16.step(1e-2);
    a32.zero_grad();
    a16.zero_grad();
  }
  auto state = a16.state();
  at::Tensor master;
  for (auto& [n, t] : state)
    if (n == "master.w.weight") master = t;
  ASSERT_TRUE(master.defined());
  EXPECT_EQ(master.scalar_type(), torch::kFloat32);
  double dm = (master - p32).abs().max().item<double>();
  double dp = (p16.to(torch::kFloat32) - p32).abs().max().item<double>();
  EXPECT_LT(dm, 0.05) << "master vs fp32 " << dm;  // bf16 gradients, 5 steps of lr 1e-2
  EXPECT_LT(dp, 0.06) << "bf16 param vs fp32 " << dp;
  // The bf16 parameter is the rounded master.
  EXPECT_TRUE(torch::equal(p16, master.to(torch::kBFloat16)));
}

TEST(AdamW, StateRoundTripContinuesIdentically) {
  torch::manual_seed(2);
  auto w0 = torch::randn({10});
  auto a = w0.clone().set_requires_grad(true);
  AdamW oa({{"w", a}}, AdamWOptions{});
  a.mutable_grad() = torch::randn({10});
  oa.step(1e-2);
  // Copy state into a fresh optimizer on a copy of the weights.
  auto b = a.detach().clone().set_requires_grad(true);
  AdamW ob({{"w", b}}, AdamWOptions{});
  NamedTensors st;
  for (auto& [n, t] : oa.state()) st.emplace_back(n, t.clone());
  ob.load_state(st, oa.steps());
  auto g = torch::randn({10});
  a.mutable_grad() = g.clone();
  b.mutable_grad() = g.clone();
  oa.step(1e-2);
  ob.step(1e-2);
  EXPECT_TRUE(torch::equal(a, b));
  EXPECT_THROW(ob.load_state({}, 1), Error);
}

TEST(Schedule, WarmupCosineLinearConstantWithFloor) {
  // Hand values: lr 1e-3, floor 1e-4, warmup 10 of 110 steps.
  Schedule s{"cosine", 1e-3, 1e-4, 10, 110};
  EXPECT_DOUBLE_EQ(s.lr_at(0), 0.0);          // HF: warmup starts at 0
  EXPECT_DOUBLE_EQ(s.lr_at(5), 5e-4);         // 1e-3 * 5/10
  EXPECT_DOUBLE_EQ(s.lr_at(10), 1e-3);        // peak
  EXPECT_NEAR(s.lr_at(60), 5.5e-4, 1e-15);    // halfway: 1e-4 + 9e-4 * 0.5
  EXPECT_NEAR(s.lr_at(110), 1e-4, 1e-15);     // floor
  s.kind = "linear";
  EXPECT_NEAR(s.lr_at(35), 1e-4 + 9e-4 * 0.75, 1e-15);
  s.kind = "constant";
  EXPECT_DOUBLE_EQ(s.lr_at(100), 1e-3);
  // The report's SFT: 7e-6 -> 7e-7 without warmup.
  Schedule sft{"cosine", 7e-6, 7e-7, 0, 100};
  EXPECT_DOUBLE_EQ(sft.lr_at(0), 7e-6);
  EXPECT_NEAR(sft.lr_at(100), 7e-7, 1e-18);
}

// A tied embedding's gradient is sparse (the rows a batch used) when no lm_head loss densified it
// (the model's forward asks at::embedding for a sparse gradient then): clipping and AdamW must treat
// it as its dense equivalent. The sparse gradient repeats a row (uncoalesced).
TEST(AdamW, SparseGradientSameAsDense) {
  torch::manual_seed(4);
  auto w0 = torch::randn({10, 6});
  auto idx = torch::tensor({{1, 7, 1, 3}}, torch::kLong);
  auto vals = torch::randn({4, 6});
  auto sparse = torch::sparse_coo_tensor(idx, vals, {10, 6});
  AdamWOptions opt{0.9, 0.95, 1e-8, 0.1, false};
  auto a = w0.clone().set_requires_grad(true), b = w0.clone().set_requires_grad(true);
  AdamW fa({{"embed_tokens.weight", a}}, opt), fb({{"embed_tokens.weight", b}}, opt);
  for (int step = 0; step < 3; ++step) {
    a.mutable_grad() = sparse.clone();
    b.mutable_grad() = sparse.to_dense();
    const double na = clip_grad_norm({a}, 0.5), nb = clip_grad_norm({b}, 0.5);
    EXPECT_NEAR(na, nb, 1e-5 * nb);
    fa.step(1e-2);
    fb.step(1e-2);
  }
  EXPECT_LT((a - b).abs().max().item<double>(), 1e-6);
}

TEST(Clip, GlobalNormLikeTorch) {
  auto a = torch::zeros({2}).set_requires_grad(true);
  auto b = torch::zeros({1}).set_requires_grad(true);
  a.mutable_grad() = torch::tensor({3.0f, 0.0f});
  b.mutable_grad() = torch::tensor({4.0f});
  double n = clip_grad_norm({a, b}, 1.0);
  EXPECT_DOUBLE_EQ(n, 5.0);  // sqrt(9 + 16)
  EXPECT_NEAR(a.grad()[0].item<float>(), 3.0 / (5.0 + 1e-6), 1e-7);
  EXPECT_NEAR(b.grad()[0].item<float>(), 4.0 / (5.0 + 1e-6), 1e-7);
  // Below the limit nothing changes.
  a.mutable_grad() = torch::tensor({0.3f, 0.0f});
  b.mutable_grad() = torch::tensor({0.4f});
  EXPECT_NEAR(clip_grad_norm({a, b}, 1.0), 0.5, 1e-7);
  EXPECT_FLOAT_EQ(a.grad()[0].item<float>(), 0.3f);
}

TEST(NanGuard, SkipsThenStops) {
  NanGuard g(3);
  EXPECT_TRUE(g.check(1.0, 1));
  EXPECT_FALSE(g.check(NAN, 2));
  EXPECT_FALSE(g.check(INFINITY, 3));
  EXPECT_TRUE(g.check(2.0, 4));  // the run of bad steps resets
  EXPECT_FALSE(g.check(NAN, 5));
  EXPECT_FALSE(g.check(NAN, 6));
  try {
    g.check(NAN, 7);
    FAIL() << "expected the guard to stop the run";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("3 optimizer steps in a row"), std::string::npos) << e.what();
  }
  EXPECT_EQ(g.skipped_total(), 5);
}

}  // namespace
}  // namespace ptk::optim
