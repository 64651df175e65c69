// AdamW against torch.optim.AdamW (the HF fixture's recorded step, and 12 steps of two param groups
// run live in the venv), fused vs reference path, bf16 master weights, schedules, clipping and the
// NaN guard.
#include <gtest/gtest.h>
#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <map>

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

// bf16 parameters keep fp32 master weights and fp32 moments. Ten steps of lr 1e-3 from weights of
// size ~1: a step (<= ~lr) is below half of bf16's spacing for |w| >= 0.5 (2^-9 ~ 2e-3 and up), so
// an update applied to the bf16 tensor itself would mostly round away; noisy gradients whose scale
// changes every step make the moments matter (with steady gradients Adam's step is ~lr·sign(g)
// whatever m and v hold). The checks:
// - the fp32 run moved the weights by a meaningful amount (else every bound below passes vacuously);
// - the master equals an fp32 AdamW fed the same bf16-rounded gradients (same arithmetic, so only
//   rounding-order noise: 1e-6 relative);
// - the master tracks the fp32 run (unrounded gradients) to a small fraction of the movement;
// - the bf16 parameter is the master rounded to bf16.
TEST(AdamW, Bf16MasterWeightsTrackFp32) {
  torch::manual_seed(1);
  constexpr int kSteps = 10;
  constexpr double kLr = 1e-3;
  // Start from bf16-representable weights, so both runs start from the same values.
  auto w0 = torch::randn({64, 16}).to(torch::kBFloat16).to(torch::kFloat32);
  auto drift = torch::randn({64, 16});  // a persistent gradient component, so the weights travel
  auto p32 = w0.clone().set_requires_grad(true);
  auto pr = w0.clone().set_requires_grad(true);  // fp32, fed the bf16-rounded gradients
  auto p16 = w0.to(torch::kBFloat16).set_requires_grad(true);
  AdamWOptions opt{0.9, 0.95, 1e-8, 0.01, false};
  AdamW a32({{"w.weight", p32}}, opt), ar({{"w.weight", pr}}, opt), a16({{"w.weight", p16}}, opt);
  const double scales[kSteps] = {1.0, 0.1, 3.0, 1.0, 0.02, 2.0, 0.5, 1.0, 4.0, 0.3};
  for (int step = 0; step < kSteps; ++step) {
    auto g = (drift + 1.5 * torch::randn({64, 16})) * scales[step];
    auto g16 = g.to(torch::kBFloat16);
    p32.mutable_grad() = g;
    pr.mutable_grad() = g16.to(torch::kFloat32);
    p16.mutable_grad() = g16;
    a32.step(kLr);
    ar.step(kLr);
    a16.step(kLr);
  }
  at::Tensor master;
  for (auto& [n, t] : a16.state()) {
    EXPECT_EQ(t.scalar_type(), torch::kFloat32) << n;  // moments and master in fp32
    if (n == "master.w.weight") master = t;
  }
  ASSERT_TRUE(master.defined());
  const double moved = (p32 - w0).norm().item<double>();
  const double moved_mean = (p32 - w0).abs().mean().item<double>();
  // Adam moves an element by at most ~lr a step; the drift keeps most going one way, so the mean
  // is several lr over 10 steps (measured 4.3e-3). A frozen weight gives 0.
  EXPECT_GT(moved_mean, 2.5e-3) << "the fp32 run barely moved: the comparisons below would prove nothing";
  // Same inputs, same arithmetic: equal up to float rounding order (|w| <~ 5: 1e-6 relative).
  const double d_exact = ((master - pr).abs() / pr.abs().clamp_min(1.0)).max().item<double>();
  EXPECT_LT(d_exact, 1e-6) << "bf16 master vs fp32 AdamW on the same bf16-rounded gradients";
  // Rounding the gradients to bf16 changes each by <= 2^-9 relative; m/sqrt(v) passes that on at
  // most at about 2^-8 (~0.4%) of each step, more only where m nearly cancels (measured: 0.05% of
  // the movement's norm). 3% still fails each sabotage tried: the bf16 update skipped (100%), the
  // moments zeroed every step (50%), the update applied to the bf16 tensor itself (87%).
  const double d_track = (master - p32).norm().item<double>();
  EXPECT_LT(d_track, 0.03 * moved) << "|master - fp32| = " << d_track << " for a movement of " << moved;
  // The bf16 parameter is the rounded master; so it moved too (to bf16 resolution).
  EXPECT_TRUE(torch::equal(p16, master.to(torch::kBFloat16)));
  const double moved16 = (p16.to(torch::kFloat32) - w0).abs().mean().item<double>();
  EXPECT_GT(moved16, 0.5 * moved_mean) << "the bf16 parameter did not follow its master";
}

// The value `t` rounds to in bf16, as fp32: the reference's inputs are bf16-representable, so the
// bf16 path starts from and is fed exactly what the fp32 runs are.
at::Tensor bf16_exact(const at::Tensor& t) { return t.to(torch::kBFloat16).to(torch::kFloat32); }

std::vector<float> floats(const rapidjson::Value& a) {
  std::vector<float> v;
  for (const auto& x : a.GetArray()) v.push_back(static_cast<float>(x.GetDouble()));
  return v;
}

// ptk's AdamW and Schedule against torch.optim.AdamW stepped by transformers' cosine-with-min-lr
// schedule (tests/optim/torch_adamw_reference.py) for 12 steps: at step 1 the update is ~lr·sign(g)
// whatever β2, ε and bias correction do; over 12 steps with β2 = 0.95 (bias correction 1 - 0.95^k
// still far from 1), gradient scales changing 100x between steps, and one tensor whose gradients
// (~1e-6) are the size of ε = 1e-6, each term shows. Two groups: ptk's no-decay names (biases,
// norms) against a torch group with weight_decay 0. The lr warms up from 0 (step 1 only fills the
// moments) and decays by cosine to a floor. Every step's parameters are compared, for fp32 and for
// bf16 parameters (fp32 master weights and moments).
TEST(AdamW, MatchesTorchAdamWOverStepsWithGroups) {
  std::string py = test::reference_python();
  if (py.empty()) PTK_SKIP_WITHOUT("venv") << "no .venv python with torch and transformers: torch.optim.AdamW comparison skipped";
  constexpr int kSteps = 12;
  const AdamWOptions opt{0.8, 0.95, 1e-6, 0.1, false};
  const Schedule sched{"cosine", 1e-2, 1e-3, 3, kSteps};
  const double scales[kSteps] = {1.0, 0.1, 3.0, 1.0, 0.01, 2.0, 0.5, 1.0, 5.0, 0.2, 1.0, 0.05};
  struct Param {
    std::string name;
    std::vector<int64_t> shape;
    bool no_decay;
    double grad_scale;
    at::Tensor init;
    std::vector<at::Tensor> grads;
  };
  std::vector<Param> ps = {{"layer.weight", {6, 5}, false, 1.0, {}, {}},
                           {"layer.bias", {5}, true, 1.0, {}, {}},
                           {"model.norm.weight", {5}, true, 1.0, {}, {}},
                           {"embed_tokens.weight", {7, 5}, false, 1e-6, {}, {}}};
  torch::manual_seed(5);
  rapidjson::StringBuffer buf;
  rapidjson::Writer<rapidjson::StringBuffer> w(buf);
  auto write_floats = [&](const at::Tensor& t) {
    w.StartArray();
    auto c = t.contiguous();
    for (int64_t i = 0; i < c.numel(); ++i) w.Double(c.data_ptr<float>()[i]);  // exact: a float is a double
    w.EndArray();
  };
  w.StartObject();
  w.Key("betas"), w.StartArray(), w.Double(opt.beta1), w.Double(opt.beta2), w.EndArray();
  w.Key("eps"), w.Double(opt.eps);
  w.Key("weight_decay"), w.Double(opt.weight_decay);
  w.Key("steps"), w.Int(kSteps);
  w.Key("schedule"), w.StartObject();
  w.Key("lr"), w.Double(sched.lr), w.Key("min_lr"), w.Double(sched.min_lr);
  w.Key("warmup_steps"), w.Int64(sched.warmup_steps), w.Key("total_steps"), w.Int64(sched.total_steps);
  w.EndObject();
  w.Key("params"), w.StartArray();
  for (auto& p : ps) {
    ASSERT_EQ(is_no_decay(p.name), p.no_decay) << p.name;
    p.init = bf16_exact(torch::randn(p.shape));
    auto drift = torch::randn(p.shape);  // a persistent component: the weights travel
    for (int k = 0; k < kSteps; ++k)
      p.grads.push_back(bf16_exact((0.5 * drift + torch::randn(p.shape)) * scales[k] * p.grad_scale));
    w.StartObject();
    w.Key("name"), w.String(p.name.c_str());
    w.Key("shape"), w.StartArray();
    for (int64_t d : p.shape) w.Int64(d);
    w.EndArray();
    w.Key("no_decay"), w.Bool(p.no_decay);
    w.Key("init"), write_floats(p.init);
    w.Key("grads"), w.StartArray();
    for (const auto& g : p.grads) write_floats(g);
    w.EndArray();
    w.EndObject();
  }
  w.EndArray();
  w.EndObject();
  test::TempDir dir;
  std::string in = dir.write("in.json", std::string(buf.GetString(), buf.GetSize()));
  auto r = test::run(py + " " + test::source_dir() + "/tests/optim/torch_adamw_reference.py " + in + " " +
                     dir.file("out.json"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  auto ref = json::parse_file(dir.file("out.json"));
  ASSERT_EQ(ref["lr"].Size(), static_cast<rapidjson::SizeType>(kSteps));

  NamedTensors n32, n16;
  std::vector<at::Tensor> p32, p16;
  for (const auto& p : ps) {
    p32.push_back(p.init.clone().set_requires_grad(true));
    p16.push_back(p.init.to(torch::kBFloat16).set_requires_grad(true));
    n32.emplace_back(p.name, p32.back());
    n16.emplace_back(p.name, p16.back());
  }
  AdamW a32(n32, opt), a16(n16, opt);
  // The same fp32 operations in the same order as torch's single-tensor path: differences come only
  // from where scalars are rounded (step size, bias corrections), a few ulps that stay a few ulps
  // over 12 steps. 1e-6 relative (|w| >= 1; absolute below) is ~8 ulps; errors in the update move
  // a parameter far more (sabotaged AdamW, first failing element: biases and norms decayed 7.7e-5, ε at
  // 1e-8 1.4e-3, no β2 bias correction 6.9e-3; bf16 update skipped or moments dropped alike).
  auto tol = [](float ref) { return 1e-6 * std::max(1.0f, std::fabs(ref)); };
  double worst = 0;
  for (int k = 0; k < kSteps; ++k) {
    const double lr = sched.lr_at(k);
    EXPECT_NEAR(lr, ref["lr"][k].GetDouble(), 1e-12 * sched.lr) << "lr of step " << k + 1;
    for (size_t i = 0; i < ps.size(); ++i) {
      p32[i].mutable_grad() = ps[i].grads[k].clone();
      p16[i].mutable_grad() = ps[i].grads[k].to(torch::kBFloat16);
    }
    a32.step(lr);
    a16.step(lr);
    NamedTensors st16 = a16.state();
    for (size_t i = 0; i < ps.size(); ++i) {
      const std::string& name = ps[i].name;
      std::vector<float> want = floats(ref["params"][name.c_str()][k]);
      at::Tensor master;
      for (auto& [n, t] : st16)
        if (n == "master." + name) master = t.contiguous();
      ASSERT_TRUE(master.defined()) << name;
      auto got32 = p32[i].detach().contiguous();
      auto got16 = p16[i].detach().to(torch::kFloat32).contiguous();
      ASSERT_EQ(got32.numel(), static_cast<int64_t>(want.size()));
      for (size_t j = 0; j < want.size(); ++j) {
        const float g = got32.data_ptr<float>()[j], m = master.data_ptr<float>()[j], b = got16.data_ptr<float>()[j];
        worst = std::max(worst, static_cast<double>(std::max(std::fabs(g - want[j]), std::fabs(m - want[j])) /
                                                     std::max(1.0f, std::fabs(want[j]))));
        ASSERT_NEAR(g, want[j], tol(want[j])) << "fp32 " << name << "[" << j << "] after step " << k + 1;
        // The bf16 path's master saw the same values (bf16-representable inputs), so fp32 tolerance.
        ASSERT_NEAR(m, want[j], tol(want[j])) << "bf16 master " << name << "[" << j << "] after step " << k + 1;
        // The bf16 parameter is the master rounded to nearest: within half of bf16's spacing,
        // 2^-8 relative (8 significant bits).
        ASSERT_LE(std::fabs(b - want[j]), std::ldexp(std::fabs(want[j]), -8) + tol(want[j]))
            << "bf16 parameter " << name << "[" << j << "] after step " << k + 1;
      }
    }
  }
  // The comparison means something only if the parameters moved (measured mean 0.012 to 0.025).
  for (size_t i = 0; i < ps.size(); ++i) {
    const double moved = (p32[i].detach() - ps[i].init).abs().mean().item<double>();
    EXPECT_GT(moved, 0.005) << ps[i].name << " barely moved";
  }
  EXPECT_LT(worst, 1e-6);  // measured 7.5e-9: one ulp of a small value
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

// The path step() takes is a function of the device: the fused one-pass kernel on the CPU, ATen's
// fused multi-tensor kernel (torch.optim.AdamW(fused=True)) on CUDA, the reference ops elsewhere.
TEST(AdamW, PathChosenByDevice) {
  EXPECT_EQ(adamw_path_for(at::Device(at::kCPU)), AdamWPath::kCpuFused);
  EXPECT_EQ(adamw_path_for(at::Device(at::kCUDA, 0)), AdamWPath::kMultiTensor);
  EXPECT_EQ(adamw_path_for(at::Device(at::kCUDA, 3)), AdamWPath::kMultiTensor);
  EXPECT_EQ(adamw_path_for(at::Device(at::kMeta)), AdamWPath::kReference);
  EXPECT_STREQ(adamw_path_name(AdamWPath::kMultiTensor), "multi_tensor");
  auto p = torch::zeros({3}).set_requires_grad(true);
  AdamW a({{"w", p}}, AdamWOptions{});
  EXPECT_EQ(a.path(), AdamWPath::kCpuFused);
  a.set_fused(false);
  EXPECT_EQ(a.path(), AdamWPath::kReference);
  a.set_fused(true);
  EXPECT_EQ(a.path(), AdamWPath::kCpuFused);
  EXPECT_EQ(norm_path_for(at::Device(at::kCPU)), NormPath::kCpuOrdered);
  EXPECT_EQ(norm_path_for(at::Device(at::kCUDA, 0)), NormPath::kForeach);
}

// Runs `steps` AdamW steps over a decay weight, a no-decay bias and norm, and a weight that gets no
// gradient on odd steps, on the given path and dtype; returns the fp32 weights (the masters for bf16)
// then the moments, by name.
std::map<std::string, at::Tensor> run_paths(AdamWPath path, at::ScalarType dtype, int steps,
                                            std::map<std::string, at::Tensor>* params_out = nullptr,
                                            double cast_chunk_bytes = 512.0 * (1 << 20)) {
  torch::manual_seed(11);
  const std::vector<std::pair<std::string, std::vector<int64_t>>> shapes = {
      {"layers.0.mlp.up_proj.weight", {37, 19}}, {"layers.0.self_attn.q_proj.bias", {37}},
      {"layers.0.input_layernorm.weight", {19}}, {"lm_head.weight", {23, 19}}};
  NamedTensors params;
  std::vector<at::Tensor> inits;
  for (auto& [n, shape] : shapes) {
    auto w = torch::randn(shape).to(torch::kBFloat16).to(torch::kFloat32);  // bf16-exact start
    params.emplace_back(n, w.to(dtype).set_requires_grad(true));
  }
  AdamW opt(params, AdamWOptions{0.9, 0.95, 1e-8, 0.1, false});
  opt.set_path(path);
  opt.set_cast_chunk_bytes(cast_chunk_bytes);
  for (int step = 0; step < steps; ++step) {
    const double scale = step % 3 == 0 ? 1.0 : step % 3 == 1 ? 1e-2 : 5.0;
    for (size_t i = 0; i < params.size(); ++i) {
      auto g = (torch::randn(params[i].second.sizes()) * scale).to(dtype);
      if (i == 3 && step % 2 == 1) params[i].second.mutable_grad().reset();  // no gradient: skipped
      else params[i].second.mutable_grad() = g;
    }
    opt.step(step < 2 ? 1e-2 : 3e-3);
  }
  std::map<std::string, at::Tensor> out;
  for (auto& [n, t] : opt.state()) out[n] = t.clone();
  for (auto& [n, p] : params) {
    if (dtype == torch::kFloat32) out["w." + n] = p.detach().clone();
    if (params_out) (*params_out)[n] = p.detach().clone();
  }
  return out;
}

// ATen's fused multi-tensor AdamW (the CUDA path) run through its CPU kernel equals the reference
// ops and ptk's one-pass CPU kernel within fp32 rounding, for fp32 parameters: weights and moments
// of every tensor, decay and no-decay groups, a parameter without a gradient on some steps. A decay
// applied to the wrong group would move those weights by lr·wd·|w| ~ 1e-3 a step; the bound is 2e-6.
TEST(AdamW, MultiTensorEqualsReferenceAndCpuKernelFp32) {
  auto multi = run_paths(AdamWPath::kMultiTensor, torch::kFloat32, 7);
  auto ref = run_paths(AdamWPath::kReference, torch::kFloat32, 7);
  auto cpu = run_paths(AdamWPath::kCpuFused, torch::kFloat32, 7);
  auto start = run_paths(AdamWPath::kReference, torch::kFloat32, 0);
  ASSERT_EQ(multi.size(), ref.size());
  for (auto& [n, t] : ref) {
    ASSERT_TRUE(multi.count(n)) << n;
    auto rel = [&](const at::Tensor& a) { return ((a - t).abs() / t.abs().clamp_min(1.0)).max().item<double>(); };
    EXPECT_LT(rel(multi[n]), 2e-6) << n << " multi-tensor vs reference";
    EXPECT_LT(rel(cpu[n]), 2e-6) << n << " one-pass CPU kernel vs reference";
  }
  for (auto& [n, t] : start) {
    if (n.rfind("w.", 0) != 0) continue;
    EXPECT_GT((ref[n] - t).abs().mean().item<double>(), 5e-3) << n << " barely moved: the comparison proves nothing";
  }
}

// bf16 parameters: the multi-tensor path updates the fp32 masters (gradients cast to fp32), then
// refreshes the bf16 parameters from them: masters and moments equal the reference path's within
// fp32 rounding, and each bf16 parameter is exactly its master rounded.
TEST(AdamW, MultiTensorBf16MasterEqualsReference) {
  std::map<std::string, at::Tensor> pm, pr;
  auto multi = run_paths(AdamWPath::kMultiTensor, torch::kBFloat16, 7, &pm);
  auto ref = run_paths(AdamWPath::kReference, torch::kBFloat16, 7, &pr);
  int masters = 0;
  for (auto& [n, t] : ref) {
    ASSERT_TRUE(multi.count(n)) << n;
    EXPECT_EQ(multi[n].scalar_type(), torch::kFloat32) << n;
    EXPECT_LT(((multi[n] - t).abs() / t.abs().clamp_min(1.0)).max().item<double>(), 2e-6) << n;
    masters += n.rfind("master.", 0) == 0;
  }
  EXPECT_EQ(masters, 4);
  for (auto& [n, p] : pm) {
    EXPECT_EQ(p.scalar_type(), torch::kBFloat16) << n;
    EXPECT_TRUE(torch::equal(p, multi["master." + n].to(torch::kBFloat16))) << n << " is not its master rounded";
  }
  // One call per tensor (the fp32 copies of bf16 gradients cut into chunks): the same bits.
  std::map<std::string, at::Tensor> pc;
  auto chunked = run_paths(AdamWPath::kMultiTensor, torch::kBFloat16, 7, &pc, /*cast_chunk_bytes=*/1);
  for (auto& [n, t] : multi) EXPECT_TRUE(torch::equal(chunked[n], t)) << n << " chunked";
  for (auto& [n, p] : pm) EXPECT_TRUE(torch::equal(pc[n], p)) << n << " chunked";
}

// The old clip_grad_norm: per-tensor fp32 norms, squares summed in fp32 in order, root in fp64.
double old_grad_norm(const std::vector<at::Tensor>& params) {
  at::Tensor total;
  for (const auto& p : params) {
    if (!p.grad().defined()) continue;
    const at::Tensor& g = p.grad();
    at::Tensor n = (g.is_sparse() ? g.coalesce().values() : g).to(torch::kFloat32).norm(2);
    total = total.defined() ? total + n * n : n * n;
  }
  return total.defined() ? std::sqrt(total.item<double>()) : 0.0;
}

std::vector<at::Tensor> clip_params(uint64_t seed, double scale) {
  torch::manual_seed(seed);
  std::vector<at::Tensor> ps;
  for (auto shape : std::vector<std::vector<int64_t>>{{300, 17}, {17}, {5, 4, 3}, {1}, {4096}}) {
    auto p = torch::zeros(shape).set_requires_grad(true);
    p.mutable_grad() = torch::randn(shape) * scale;
    ps.push_back(p);
  }
  auto bf = torch::zeros({33}, torch::kBFloat16).set_requires_grad(true);
  bf.mutable_grad() = (torch::randn({33}) * scale).to(torch::kBFloat16);
  ps.push_back(bf);
  ps.push_back(torch::zeros({2}).set_requires_grad(true));  // no gradient
  return ps;
}

// On the CPU the _foreach-based norm and clip give today's bits: the norm equals the old per-tensor
// formula exactly, and the clipped gradients equal g * float(max_norm / (norm + 1e-6)) exactly;
// below the limit the gradients are untouched. The kForeach path (what CUDA runs: the norm of the
// norms, a device-scalar multiply) agrees within fp32 rounding.
TEST(Clip, ForeachNormBitIdenticalOnCpuAndForeachPathWithinRounding) {
  for (double scale : {0.01, 1.0, 30.0}) {
    auto a = clip_params(5, scale), b = clip_params(5, scale), before = clip_params(5, scale);
    const double old = old_grad_norm(a);
    at::Tensor na = clip_grad_norm_tensor(a, 1.0);
    EXPECT_EQ(na.scalar_type(), at::kDouble);
    EXPECT_EQ(na.item<double>(), old) << "scale " << scale;
    at::Tensor nb = clip_grad_norm_tensor(b, 1.0, NormPath::kForeach);
    EXPECT_EQ(nb.dim(), 0);
    EXPECT_NEAR(nb.item<double>(), old, 2e-6 * old) << "scale " << scale;
    const double coef = 1.0 / (old + 1e-6);
    for (size_t i = 0; i < a.size(); ++i) {
      if (!a[i].grad().defined()) continue;
      at::Tensor want = coef < 1.0 ? before[i].grad().mul(coef) : before[i].grad();
      EXPECT_TRUE(torch::equal(a[i].grad(), want)) << "tensor " << i << " scale " << scale;
      const double d = (b[i].grad().to(torch::kFloat32) - want.to(torch::kFloat32)).abs().max().item<double>();
      const double tol = (a[i].grad().scalar_type() == torch::kBFloat16 ? 8e-3 : 2e-6) *
                         std::max(1.0, want.to(torch::kFloat32).abs().max().item<double>());
      EXPECT_LE(d, tol) << "foreach path, tensor " << i << " scale " << scale;
    }
  }
}

// A non-finite norm leaves the gradients as they are on both paths (the NaN guard skips the step).
TEST(Clip, NonFiniteNormLeavesGradientsAlone) {
  for (NormPath path : {NormPath::kCpuOrdered, NormPath::kForeach}) {
    auto a = clip_params(6, 10.0), before = clip_params(6, 10.0);
    a[2].mutable_grad()[1][2][0] = NAN;
    before[2].mutable_grad()[1][2][0] = NAN;
    EXPECT_TRUE(std::isnan(clip_grad_norm_tensor(a, 1.0, path).item<double>()));
    for (size_t i = 0; i < a.size(); ++i)
      if (a[i].grad().defined()) EXPECT_TRUE(torch::equal(a[i].grad().nan_to_num(), before[i].grad().nan_to_num())) << i;
  }
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
