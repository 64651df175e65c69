// Finite-difference gradient check of the DPO stage's loss on a tiny random Qwen2 (2 layers, hidden
// 32, the byte tokenizer's 259 ids): DpoStage::loss — the code `ptk dpo` trains with (one batch of
// chosen + rejected rows, the fused lm_head log-prob op, dpo_loss / cpo_loss) — differentiated by
// autograd, against central differences of the same loss on sampled parameter entries (embedding,
// q_proj weight and bias, a layer norm, the final norm, the untied lm_head).
//
// Precision: the fused op computes in float32 whatever the model's dtype (core/model/lm_head_logprobs.h)
// and the stage loads float32 weights, so there is no float64 path to check. In float32 the loss
// carries rounding noise of ~1e-6 (sequence sums s(y) of ~-50 have an ulp of ~4e-6, times dL/ds), so
// the step is large, h = 5e-2 (weights are ~0.04, norms 1), with a sixth-order central stencil to
// keep the truncation error small; measured on this model the noise floor of a difference is then
// ~2e-5 (it is ~1e-4 at h = 1e-2, and at h = 8e-2 truncation reaches 2% on the norm weights).
// Tolerances: |fd - ag| <= 4e-5 + 2e-2 |ag| per entry (the largest entries are 1e-3 to 0.6), and
// 5e-3 relative on the derivative along the tensor's whole gradient direction (which is |g|).
// Not the losses' own numbers (tests/rl_losses) and not the stage's bookkeeping (dpo_stage_test).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/config/recipe.h"
#include "core/model/qwen2.h"
#include "core/train/trainer.h"
#include "core/util/fs.h"
#include "datasets/byte_tokenizer.h"
#include "rl/dpo_stage.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_qwen2.h"

namespace ptk::rl {
namespace {

checkpoint::Qwen2Config tiny_config(bool tied) {
  auto c = test::tiny_byte_qwen2_config();
  c.intermediate_size = 48;
  c.tie_word_embeddings = tied;
  return c;
}

// A temp folder with the byte tokenizer, a random-init "SFT final" folder and a few pairs whose
// replies differ in length (so ipo's and sigmoid_norm's length normalisation matter).
struct Fixture {
  test::TempDir dir;
  std::string model_dir, train_file;
  explicit Fixture(bool tied) {
    model_dir = dir.file("sft-final");
    make_dirs(model_dir);
    tasks::write_byte_tokenizer(model_dir);
    auto m = model::Qwen2Model::from_config(tiny_config(tied), 11);
    checkpoint::SaveOptions so;
    so.source_dir = model_dir;
    m.save_pretrained(model_dir, so);
    std::string train;
    for (int i = 0; i < 4; ++i) {
      int a = 12 + 9 * i, b = 7 + 4 * i;
      train += "{\"prompt\": \"" + std::to_string(a) + "+" + std::to_string(b) + "=\", \"chosen\": \"" +
               std::to_string(a + b) + (i % 2 ? " exactly" : "") + "\", \"rejected\": \"" +
               std::to_string(a + b + 1 + i) + (i == 2 ? ", I think" : "") + "\"}\n";
    }
    train_file = dir.write("train.jsonl", train);
  }
  void bind(DpoRecipe& r, const std::string& run, const std::vector<std::string>& overrides) const {
    std::string recipe = dir.write("recipe.json", "{\"model\": {\"path\": \"" + model_dir + "\"},\n"
                                                  " \"run\": {\"seed\": 5, \"dir\": \"" + run + "\"},\n"
                                                  " \"data\": {\"train\": [\"" + train_file + "\"], \"max_seq_len\": 64},\n"
                                                  " \"train\": {\"micro_batch_size\": 4}}\n");
    auto json = config::load_recipe(recipe, overrides);
    config::bind_recipe(json, r.all_sections());
  }
};

struct Case {
  const char* name;
  std::vector<std::string> overrides;
  bool tied = true;
};

// The stage's micro-batch loss at the current parameters, as the loop computes it (step N = 1).
double loss_value(DpoStage& stage, const train::MicroBatch& mb) {
  torch::NoGradGuard ng;
  return stage.loss(mb, 1.0).loss.item<double>();
}

// Sixth-order central difference of the loss along `dir` (same shape as p), step h.
double directional_fd(DpoStage& stage, const train::MicroBatch& mb, at::Tensor p, const at::Tensor& dir, double h) {
  torch::NoGradGuard ng;
  auto at_step = [&](double t) {
    p.add_(dir, t);
    double f = loss_value(stage, mb);
    p.sub_(dir, t);
    return f;
  };
  const double f1 = at_step(h) - at_step(-h), f2 = at_step(2 * h) - at_step(-2 * h),
               f3 = at_step(3 * h) - at_step(-3 * h);
  return (45 * f1 - 9 * f2 + f3) / (60 * h);
}

void check_case(const Case& c) {
  SCOPED_TRACE(c.name);
  at::set_num_threads(1);  // one summation order: the loss is a fixed function of the parameters
  Fixture f(c.tied);
  DpoRecipe r;
  f.bind(r, f.dir.file("run"), c.overrides);
  DpoStage stage(r, r.run.dir);
  stage.set_rank(0, 1);  // what the Trainer does first (builds the reference cache when precomputed)
  auto params = stage.parameters();
  // Move the policy off the reference so rewards, margins and every loss's slope are non-trivial.
  {
    torch::NoGradGuard ng;
    auto gen = at::detail::createCPUGenerator(99);
    for (auto& [n, p] : params) p.add_(at::normal(0.0, 0.03, p.sizes(), gen));
  }
  train::MicroBatch mb = stage.next_micro_batch();
  const PairBatch& b = *static_cast<const PairBatch*>(mb.data.get());
  ASSERT_EQ(static_cast<int64_t>(b.rows.size()), 4);

  train::LossOut out = stage.loss(mb, 1.0);
  const double loss = out.loss.item<double>();
  ASSERT_TRUE(std::isfinite(loss));
  out.loss.backward();
  // The gradient really flows through the policy (none into a frozen reference).
  if (stage.reference().embed_tokens_.defined()) {
    for (auto& [n, p] : stage.reference().named_parameters()) EXPECT_FALSE(p.grad().defined()) << n;
  }

  std::vector<std::string> names{"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                                 "model.layers.0.self_attn.q_proj.bias", "model.layers.1.input_layernorm.weight",
                                 "model.layers.1.mlp.down_proj.weight", "model.norm.weight"};
  if (!c.tied) names.push_back("lm_head.weight");
  const double h = 5e-2, atol = 4e-5, rtol = 2e-2;
  int checked = 0, nonzero = 0;
  for (const auto& name : names) {
    SCOPED_TRACE(name);
    auto it = std::find_if(params.begin(), params.end(), [&](const auto& kv) { return kv.first == name; });
    ASSERT_NE(it, params.end());
    at::Tensor p = it->second;
    ASSERT_TRUE(p.grad().defined());
    at::Tensor g = p.grad().detach().clone().reshape(-1);  // (numel)
    const double gmax = g.abs().max().item<double>();
    ASSERT_GT(gmax, 1e-4) << "no gradient reaches " << name;
    // Entries: the 3 largest |g| (well-conditioned) plus 3 seeded random ones (often small or zero).
    std::vector<int64_t> idx;
    at::Tensor top = std::get<1>(g.abs().topk(std::min<int64_t>(3, g.numel())));
    for (int64_t i = 0; i < top.numel(); ++i) idx.push_back(top[i].item<int64_t>());
    auto gen = at::detail::createCPUGenerator(17 + checked);
    at::Tensor rnd = at::randint(g.numel(), {3}, gen, at::kLong);
    for (int64_t i = 0; i < 3; ++i) idx.push_back(rnd[i].item<int64_t>());
    for (int64_t i : idx) {
      at::Tensor e = torch::zeros({g.numel()});
      e[i] = 1.0;
      const double fd = directional_fd(stage, mb, p, e.view(p.sizes()), h);
      const double ag = g[i].item<double>();
      EXPECT_NEAR(fd, ag, atol + rtol * std::abs(ag)) << name << "[" << i << "] loss " << loss;
      ++checked;
      if (std::abs(ag) > 10 * atol) ++nonzero;
    }
    // The whole tensor at once: along u = g/|g| the derivative is |g|. A wrong gradient in entries
    // the sample above missed shows here.
    const double gnorm = g.norm().item<double>();
    at::Tensor u = (g / gnorm).view(p.sizes());
    const double fd_dir = directional_fd(stage, mb, p, u, h);
    EXPECT_NEAR(fd_dir, gnorm, 5e-3 * gnorm + atol) << name << " along its gradient";
  }
  EXPECT_GE(nonzero, static_cast<int>(names.size()) * 3) << "the sample should hold clearly non-zero gradients";
}

TEST(DpoGradcheck, SigmoidLiveReference) {
  check_case({"sigmoid", {"dpo.loss_type=\"sigmoid\"", "dpo.beta=0.5", "dpo.precompute_ref_log_probs=false"}});
}

TEST(DpoGradcheck, IpoPrecomputedReference) {
  check_case({"ipo", {"dpo.loss_type=\"ipo\"", "dpo.beta=0.5", "dpo.precompute_ref_log_probs=true",
                      "dpo.precompute_ref_batch_size=3"}});
}

TEST(DpoGradcheck, RobustWithLabelSmoothing) {
  check_case({"robust", {"dpo.loss_type=\"robust\"", "dpo.beta=0.5", "dpo.label_smoothing=0.2",
                         "dpo.precompute_ref_log_probs=false"}});
}

TEST(DpoGradcheck, WeightedListSigmoidNormAndSftUntiedHead) {
  check_case({"sigmoid_norm+sft",
              {"dpo.loss_type=[\"sigmoid_norm\",\"sft\"]", "dpo.loss_weights=[1.0,0.3]", "dpo.beta=0.5",
               "dpo.precompute_ref_log_probs=false"},
              false});
}

TEST(DpoGradcheck, LdDpoLengthWeighting) {
  check_case({"ld_alpha", {"dpo.loss_type=\"sigmoid\"", "dpo.beta=0.5", "dpo.ld_alpha=0.5",
                           "dpo.precompute_ref_log_probs=false"}});
}

// model.activation_checkpointing recomputes each decoder layer in backward: the same gradient.
TEST(DpoGradcheck, SigmoidWithActivationCheckpointing) {
  check_case({"checkpointed", {"dpo.loss_type=\"sigmoid\"", "dpo.beta=0.5", "model.activation_checkpointing=true",
                               "dpo.precompute_ref_log_probs=false"}});
}

TEST(DpoGradcheck, CpoSimpoNoReference) {
  check_case({"simpo", {"dpo.algorithm=\"cpo\"", "dpo.loss_type=\"simpo\"", "dpo.beta=2.0", "dpo.simpo_gamma=0.5",
                        "dpo.cpo_alpha=0.5"}});
}

}  // namespace
}  // namespace ptk::rl
