// The DPO stage on a tiny random Qwen2 with the byte-level tokenizer and hand-written pairs: its
// micro-batch loss equals rl/dpo_loss on log-probs computed by hand from full logits; chosen and
// rejected in one batch equal separate passes; precomputed reference == live reference; the
// reference is never updated; resume is bit-for-bit; recipe validation. Not the losses' own
// numbers (tests/rl_losses), not the ptk binary (dpo_cli_test).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>
#include <sstream>

#include "core/config/recipe.h"
#include "core/model/qwen2.h"
#include "core/train/trainer.h"
#include "core/train/from_recipe.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "datasets/byte_tokenizer.h"
#include "datasets/prepare.h"
#include "rl/dpo_stage.h"
#include "tests/dpo/dpo_test_support.h"
#include "tests/support/crashing_stage.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_qwen2.h"

namespace ptk::rl {
namespace {

// The byte tokenizer, a random-init "SFT final" HF folder and 12 pairs (dpo_test_support.h).
struct Fixture : test_support::SftFolderAndPairs {
  // A recipe bound from JSON (the same path `ptk dpo` takes) plus key=value overrides.
  void bind(DpoRecipe& r, const std::string& run, std::vector<std::string> overrides = {}) const {
    std::string recipe = dir.write("recipe.json", "{\"model\": {\"path\": \"" + model_dir + "\"},\n"
                                                  " \"run\": {\"seed\": 3, \"dir\": \"" + run + "\"},\n"
                                                  " \"data\": {\"train\": [\"" + train_file + "\"], \"eval\": [\"" +
                                                      eval_file + "\"], \"max_seq_len\": 64},\n"
                                                  " \"train\": {\"micro_batch_size\": 3, \"grad_accum\": 2},\n"
                                                  " \"optim\": {\"lr\": 0.01, \"warmup_steps\": 0}}\n");
    auto json = config::load_recipe(recipe, overrides);
    config::bind_recipe(json, r.all_sections());
  }
};

// s(y) for every row, by hand: full logits, log_softmax, gather, sum over the completion mask.
at::Tensor hand_logps(const model::Qwen2Model& m, const PairBatch& b) {
  torch::NoGradGuard ng;
  model::ForwardInput in;
  in.input_ids = b.ids;
  in.attention_mask = b.attention_mask;
  at::Tensor logits = m.forward(in).logits;                           // (R, T, V)
  at::Tensor lp = torch::log_softmax(logits.slice(1, 0, -1), -1);     // (R, T-1, V) predicts t = 1..T-1
  at::Tensor tok = lp.gather(-1, b.ids.slice(1, 1).unsqueeze(-1)).squeeze(-1);  // (R, T-1)
  return (tok * b.completion_mask.slice(1, 1)).sum(1);                // (R)
}

double ratio(train::LossOut o, const std::string& name) {
  if (o.read_back) o.read_back(o);  // what the loop does once per step
  for (auto& r : o.ratios)
    if (r.name == name) return r.num / r.den;
  ADD_FAILURE() << "no metric " << name;
  return 0;
}

TEST(DpoStage, LossEqualsLossModuleOnHandMadeLogps) {
  at::set_num_threads(1);
  Fixture f;
  for (const char* loss : {"sigmoid", "[\"ipo\",\"sft\"]", "robust"}) {
    SCOPED_TRACE(loss);
    DpoRecipe r;
    f.bind(r, f.dir.file(std::string("run-") + loss[0]),
           {std::string("dpo.loss_type=") + (loss[0] == '[' ? loss : "\"" + std::string(loss) + "\""),
            "dpo.precompute_ref_log_probs=false", "dpo.label_smoothing=0.1",
            loss[0] == '[' ? "dpo.loss_weights=[1.0,0.5]" : "dpo.beta=0.1"});
    DpoStage stage(r, r.run.dir);
    // Train the policy a little so policy != reference (rewards are not all zero).
    {
      torch::NoGradGuard ng;
      for (auto& [n, p] : stage.parameters()) p.add_(torch::randn_like(p) * 0.02);
    }
    train::MicroBatch mb = stage.next_micro_batch();
    const PairBatch& b = *static_cast<PairBatch*>(mb.data.get());
    EXPECT_EQ(mb.targets, 1);  // one per micro-batch: loss / N is the mean over micro-batches
    train::LossOut out = stage.loss(mb, 2.0);

    at::Tensor pol = hand_logps(stage.policy(), b), ref = hand_logps(stage.reference(), b);
    const int64_t P = 3;
    DpoLossOutput want = dpo_loss({pol.slice(0, 0, P), pol.slice(0, P), ref.slice(0, 0, P), ref.slice(0, P),
                                   b.completion_tokens.slice(0, 0, P), b.completion_tokens.slice(0, P)},
                                  r.dpo.dpo_options());
    EXPECT_NEAR(out.loss.item<double>(), want.loss.item<double>() / 2.0, 1e-5);
    EXPECT_NEAR(ratio(out, "rewards/chosen"), want.chosen_rewards.mean().item<double>(), 1e-6);
    EXPECT_NEAR(ratio(out, "rewards/margins"),
                (want.chosen_rewards - want.rejected_rewards).mean().item<double>(), 1e-6);
    EXPECT_NEAR(ratio(out, "logps/rejected"), pol.slice(0, P).mean().item<double>(), 1e-4);
    EXPECT_DOUBLE_EQ(ratio(out, "rewards/accuracies"),
                     want.chosen_rewards.gt(want.rejected_rewards).to(torch::kDouble).mean().item<double>());
    // logits/chosen: the vocab-mean logit at the positions predicting chosen completion tokens.
    {
      torch::NoGradGuard ng;
      model::ForwardInput in;
      in.input_ids = b.ids;
      in.attention_mask = b.attention_mask;
      at::Tensor vm = stage.policy().forward(in).logits.mean(-1).slice(1, 0, -1);  // (R, T-1)
      at::Tensor m = b.completion_mask.slice(1, 1);
      double want_lc = (vm.slice(0, 0, P) * m.slice(0, 0, P)).sum().item<double>() / m.slice(0, 0, P).sum().item<double>();
      EXPECT_NEAR(ratio(out, "logits/chosen"), want_lc, 1e-5);
    }
    // The gradient flows into the policy only.
    out.loss.backward();
    double g = 0;
    for (auto& [n, p] : stage.parameters()) g += p.grad().defined() ? p.grad().abs().sum().item<double>() : 0;
    EXPECT_GT(g, 0);
    for (auto& [n, p] : stage.reference().named_parameters()) EXPECT_FALSE(p.grad().defined()) << n;
  }
}

TEST(DpoStage, CpoSimpoLossEqualsLossModule) {
  at::set_num_threads(1);
  Fixture f;
  DpoRecipe r;
  f.bind(r, f.dir.file("run"), {"dpo.algorithm=\"cpo\"", "dpo.loss_type=\"simpo\"", "dpo.beta=2.0",
                                "dpo.cpo_alpha=0.5"});
  DpoStage stage(r, r.run.dir);
  EXPECT_FALSE(stage.reference().embed_tokens_.defined());  // no reference model is loaded
  train::MicroBatch mb = stage.next_micro_batch();
  const PairBatch& b = *static_cast<PairBatch*>(mb.data.get());
  train::LossOut out = stage.loss(mb, 1.0);
  at::Tensor pol = hand_logps(stage.policy(), b);
  CpoLossOutput want = cpo_loss({pol.slice(0, 0, 3), pol.slice(0, 3), b.completion_tokens.slice(0, 0, 3),
                                 b.completion_tokens.slice(0, 3)},
                                r.dpo.cpo_options());
  EXPECT_NEAR(out.loss.item<double>(), want.loss.item<double>(), 1e-5);
  EXPECT_NEAR(ratio(out, "rewards/chosen"), want.chosen_rewards.mean().item<double>(), 1e-5);
  EXPECT_NEAR(ratio(out, "nll_loss"), want.nll.item<double>(), 1e-5);
  EXPECT_TRUE(std::isfinite(ratio(out, "logits/chosen")));
}

// Separate passes over the chosen rows and the rejected rows, each trimmed to its own length.
TEST(DpoStage, OneBatchEqualsSeparatePasses) {
  at::set_num_threads(1);
  Fixture f;
  DpoRecipe r;
  f.bind(r, f.dir.file("run"), {"dpo.ld_alpha=0.5"});
  DpoStage stage(r, r.run.dir);
  train::MicroBatch mb = stage.next_micro_batch();
  const PairBatch& b = *static_cast<PairBatch*>(mb.data.get());
  const int64_t P = 3;
  SequenceScores joint = sequence_scores(stage.policy(), b, std::nullopt);
  for (int half = 0; half < 2; ++half) {
    PairBatch s;
    at::Tensor att = b.attention_mask.slice(0, half * P, (half + 1) * P);
    const int64_t T = att.sum(1).max().item<int64_t>();
    s.ids = b.ids.slice(0, half * P, (half + 1) * P).slice(1, 0, T).contiguous();
    s.attention_mask = att.slice(1, 0, T).contiguous();
    s.completion_mask = b.completion_mask.slice(0, half * P, (half + 1) * P).slice(1, 0, T).contiguous();
    s.completion_tokens = b.completion_tokens.slice(0, half * P, (half + 1) * P);
    s.rows = b.rows;
    at::Tensor sep = sequence_scores(stage.policy(), s, std::nullopt).logps;  // (P)
    at::Tensor j = joint.logps.slice(0, half * P, (half + 1) * P);
    EXPECT_LT((sep - j).abs().max().item<double>(), 1e-5) << "half " << half << "\n" << sep << "\n" << j;
  }
  // LD-DPO in the stage: ld_alpha mixes the tail into the sums (the policy's and the reference's).
  SequenceScores ld = sequence_scores(stage.policy(), b, 0.5);
  EXPECT_FALSE(torch::allclose(ld.logps, joint.logps));
}

TEST(DpoStage, PrecomputedReferenceEqualsLiveAndIsCached) {
  at::set_num_threads(1);
  Fixture f;
  DpoRecipe live_r, pre_r;
  f.bind(live_r, f.dir.file("live"), {"dpo.precompute_ref_log_probs=false"});
  f.bind(pre_r, f.dir.file("pre"), {"dpo.precompute_ref_log_probs=true", "dpo.precompute_ref_batch_size=2"});
  DpoStage live(live_r, live_r.run.dir), pre(pre_r, pre_r.run.dir);
  pre.set_rank(0, 1);
  ASSERT_FALSE(pre.ref_cache_path().empty());
  EXPECT_TRUE(path_exists(pre.ref_cache_path()));
  EXPECT_EQ(parent_dir(pre.ref_cache_path()), parent_dir(pre.train_set().dir()));  // beside the shards
  EXPECT_FALSE(pre.reference().embed_tokens_.defined());  // freed after the pass
  for (int i = 0; i < 3; ++i) {
    train::MicroBatch a = live.next_micro_batch(), b = pre.next_micro_batch();
    const PairBatch& pa = *static_cast<PairBatch*>(a.data.get());
    const PairBatch& pb = *static_cast<PairBatch*>(b.data.get());
    ASSERT_EQ(pa.rows, pb.rows);
    at::Tensor rl = live.ref_logps(pa), rp = pre.ref_logps(pb);
    EXPECT_LT((rl - rp).abs().max().item<double>(), 1e-5) << rl << rp;
    EXPECT_NEAR(live.loss(a, 1).loss.item<double>(), pre.loss(b, 1).loss.item<double>(), 1e-5);
  }
  // A second stage reuses the file (same bytes, not rewritten); another reference gets another key.
  std::string bytes = read_file(pre.ref_cache_path());
  {
    DpoRecipe again;
    f.bind(again, f.dir.file("pre"));
    DpoStage s(again, again.run.dir);
    s.set_rank(0, 1);
    EXPECT_EQ(s.ref_cache_path(), pre.ref_cache_path());
  }
  EXPECT_EQ(read_file(pre.ref_cache_path()), bytes);
  std::string other = f.dir.file("other-ref");
  make_dirs(other);
  tasks::write_byte_tokenizer(other);
  model::Qwen2Model::from_config(test::tiny_byte_qwen2_config(), 99).save_pretrained(other);
  DpoRecipe o;
  f.bind(o, f.dir.file("pre"), {"dpo.ref_path=\"" + other + "\""});
  DpoStage s(o, o.run.dir);
  s.set_rank(0, 1);
  EXPECT_NE(s.ref_cache_path(), pre.ref_cache_path());
}

std::vector<std::string> metric_lines(const std::string& run_dir) {
  std::vector<std::string> out;
  std::istringstream in(read_file(run_dir + "/metrics.jsonl"));
  std::string line;
  while (std::getline(in, line)) {
    auto d = json::parse(line, "metrics");
    std::string keep;
    for (const char* k : {"loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen", "entropy",
                          "eval/loss", "eval/rewards/accuracies"})
      if (d.HasMember(k)) keep += std::string(k) + "=" + json::to_string(d[k]) + " ";
    out.push_back(keep);
  }
  return out;
}

TEST(DpoStage, ReferenceNeverUpdatedAndResumeIsBitForBit) {
  at::set_num_threads(1);
  Fixture f;
  std::string ref_bytes = read_file(f.model_dir + "/model.safetensors");
  const std::vector<std::string> ov{"dpo.precompute_ref_log_probs=false", "train.epochs=3", "train.eval_every=2",
                                    "checkpoint.every=2", "optim.lr=0.02"};
  // The uninterrupted run: 3 epochs of 9 pairs, 3 a micro-batch, 2 micro-batches a step -> 5 steps.
  DpoRecipe a;
  f.bind(a, f.dir.file("straight"), ov);
  DpoStage sa(a, a.run.dir);
  auto before = sa.reference().named_parameters();
  std::vector<at::Tensor> copies;
  for (auto& [n, t] : before) copies.push_back(t.clone());
  train::Trainer(sa, train::trainer_options(a, a.run.dir, "{}\n", "dpo")).run();
  auto after = sa.reference().named_parameters();
  ASSERT_EQ(after.size(), copies.size());
  double policy_moved = 0;
  for (size_t i = 0; i < after.size(); ++i) {
    EXPECT_TRUE(torch::equal(after[i].second, copies[i])) << after[i].first;
    policy_moved += (sa.policy().named_parameters()[i].second - copies[i]).abs().sum().item<double>();
  }
  EXPECT_GT(policy_moved, 0);
  EXPECT_EQ(read_file(f.model_dir + "/model.safetensors"), ref_bytes);
  auto want = metric_lines(a.run.dir);
  ASSERT_EQ(want.size(), 5u);
  EXPECT_NE(want.back().find("eval/rewards/accuracies"), std::string::npos) << want.back();

  // Crash in step 4 (micro-batch 7), resume from the step-2 checkpoint with resume=auto.
  DpoRecipe b;
  f.bind(b, f.dir.file("crash"), ov);
  {
    DpoStage sb(b, b.run.dir);
    test::CrashingStage c(sb, 7);
    EXPECT_THROW(train::Trainer(c, train::trainer_options(b, b.run.dir, "{}\n", "dpo")).run(), test::Crash);
  }
  DpoStage sc(b, b.run.dir);
  train::Trainer(sc, train::trainer_options(b, b.run.dir, "{}\n", "dpo")).run();
  auto got = metric_lines(b.run.dir);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i], want[i]) << "step " << i + 1;
  auto pa = sa.policy().named_parameters(), pc = sc.policy().named_parameters();
  for (size_t i = 0; i < pa.size(); ++i) EXPECT_TRUE(torch::equal(pa[i].second, pc[i].second)) << pa[i].first;
}

TEST(DpoStage, ValidationNamesTheKeyAndTheFix) {
  Fixture f;
  auto errors_of = [&](std::vector<std::string> ov) {
    DpoRecipe r;
    try {
      f.bind(r, f.dir.file("v"), ov);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(errors_of({"dpo.loss_type=\"sigmod\""}).find("did you mean 'sigmoid'"), std::string::npos);
  EXPECT_NE(errors_of({"dpo.loss_type=[\"sigmoid\",\"ipo\"]", "dpo.loss_weights=[1.0]"}).find("loss_weights has 1"),
            std::string::npos);
  EXPECT_NE(errors_of({"dpo.loss_type=\"simpo\""}).find("dpo.algorithm=cpo"), std::string::npos);
  EXPECT_NE(errors_of({"dpo.algorithm=\"cpo\"", "dpo.loss_type=[\"simpo\",\"hinge\"]"}).find("exactly one"),
            std::string::npos);
  EXPECT_NE(errors_of({"dpo.algorithm=\"cpo\"", "dpo.ref_path=\"x\""}).find("loads no reference"), std::string::npos);
  EXPECT_NE(errors_of({"dpo.beta=0"}).find("dpo.beta"), std::string::npos);
  EXPECT_NE(errors_of({"dpo.label_smoothing=0.5"}).find("label_smoothing"), std::string::npos);
  EXPECT_NE(errors_of({"dpo.ld_alpha=2"}).find("dpo.ld_alpha"), std::string::npos);
  EXPECT_NE(errors_of({"dpo.algorithm=\"kto\""}).find("dpo | cpo"), std::string::npos);
  EXPECT_EQ(errors_of({}), "");
}

}  // namespace
}  // namespace ptk::rl
