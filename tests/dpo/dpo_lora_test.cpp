// The DPO stage with model.lora (issue #28) on a tiny random Qwen2 (hidden 32, 2 layers) with the byte
// tokenizer and hand-written pairs, in process:
// - the reference is the policy with its adapters off: a handle on the same base tensors (no copy),
//   so the first loss is ln 2 (B = 0: policy == reference); only lora_A/lora_B are trained (the
//   stage's parameters and the checkpoint's optimizer state); the base is bit-identical after
//   training; final/ is a PEFT adapter folder (CAUSAL_LM) that Qwen2Model::from_pretrained loads as
//   base + merged adapter, giving the trained policy's logits;
// - a run killed mid-run and resumed equals the uninterrupted run bit for bit (adapter tensors,
//   losses), with LoRA dropout on;
// - precomputed reference log-probs == live ones under LoRA; with model.path an adapter folder the
//   reference is that folder's merged model and the cache key follows the adapter's files;
//   dpo.ref_path still loads an explicit reference; a reference that is no model folder is refused.
// The LoRA arithmetic is tests/model/lora_test's; DPO without LoRA is dpo_stage_test's.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <sstream>

#include "core/checkpoint/adapter_config.h"
#include "core/config/recipe.h"
#include "core/model/lora.h"
#include "core/model/qwen2.h"
#include "core/train/from_recipe.h"
#include "core/train/trainer.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "datasets/byte_tokenizer.h"
#include "rl/dpo_stage.h"
#include "tests/dpo/dpo_test_support.h"
#include "tests/support/crashing_stage.h"
#include "tests/support/run_folders.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_qwen2.h"

namespace ptk::rl {
namespace {

// The byte tokenizer, a random-init "SFT final" HF folder and 12 pairs (9 train, 3 eval; dpo_test_support.h).
struct Fixture : test_support::SftFolderAndPairs {
  // LoRA rank 4 on every linear; `overrides` as on the command line.
  void bind(DpoRecipe& r, const std::string& run, std::vector<std::string> overrides = {}) const {
    std::string recipe = dir.write("recipe.json", "{\"model\": {\"path\": \"" + model_dir + "\", \"lora\": "
                                                  "{\"enabled\": true, \"rank\": 4, \"alpha\": 8}},\n"
                                                  " \"run\": {\"seed\": 3, \"dir\": \"" + run + "\"},\n"
                                                  " \"data\": {\"train\": [\"" + train_file + "\"], \"eval\": [\"" +
                                                      eval_file + "\"], \"max_seq_len\": 64},\n"
                                                  " \"train\": {\"micro_batch_size\": 3, \"grad_accum\": 2},\n"
                                                  " \"optim\": {\"lr\": 0.01, \"warmup_steps\": 0}}\n");
    config::bind_recipe(config::load_recipe(recipe, overrides), r.all_sections());
  }
};

at::Tensor logits_of(const model::Qwen2Model& m, const PairBatch& b) {
  torch::NoGradGuard ng;
  model::ForwardInput in;
  in.input_ids = b.ids;
  in.attention_mask = b.attention_mask;
  return m.forward(in).logits;
}

std::vector<double> logged(const std::string& run_dir, const char* key) {
  std::vector<double> out;
  for (auto& d : test::metric_docs(run_dir))
    if (d.HasMember(key)) out.push_back(d[key].GetDouble());
  return out;
}

// An adapter folder on `base_dir` with nonzero B (as a trained one has), saved with its tokenizer.
void write_adapter(const std::string& base_dir, const std::string& out, uint64_t seed) {
  auto m = model::Qwen2Model::from_pretrained(base_dir);
  model::LoraOptions o;
  o.rank = 4;
  o.alpha = 8;
  auto lora = model::Lora::attach(m, o, seed);
  {
    torch::NoGradGuard ng;
    torch::manual_seed(seed);
    for (auto& [name, t] : lora.named_parameters())
      if (name.find("lora_B") != std::string::npos) t.copy_(torch::randn_like(t) * 0.5);
  }
  lora.set_base_model(base_dir);
  checkpoint::SaveOptions so;
  so.source_dir = base_dir;
  lora.save(out, so);
}

TEST(DpoLora, ReferenceIsTheAdaptersOffPolicyAndOnlyTheAdaptersTrain) {
  at::set_num_threads(1);
  Fixture f;
  const std::vector<std::string> ov{"dpo.precompute_ref_log_probs=false", "train.max_steps=3", "checkpoint.every=2",
                                    "model.lora.save_merged=true"};
  // The first micro-batch, before any update: B = 0, so policy == reference and the sigmoid loss is ln 2.
  {
    DpoRecipe r;
    f.bind(r, f.dir.file("first"), ov);
    DpoStage stage(r, r.run.dir);
    train::MicroBatch mb = stage.next_micro_batch();
    EXPECT_NEAR(stage.loss(mb, 1.0).loss.item<double>(), std::log(2.0), 1e-6);
  }
  DpoRecipe r;
  f.bind(r, f.dir.file("run"), ov);
  DpoStage stage(r, r.run.dir);
  // The reference: the same base tensors, no adapters; the policy: the base plus adapters.
  ASSERT_TRUE(stage.reference().embed_tokens_.defined());
  EXPECT_FALSE(stage.reference().has_adapters());
  EXPECT_TRUE(stage.policy().has_adapters());
  EXPECT_EQ(stage.reference().embed_tokens_.data_ptr(), stage.policy().embed_tokens_.data_ptr());
  EXPECT_EQ(stage.reference().layers_[1].q_proj_w.data_ptr(), stage.policy().layers_[1].q_proj_w.data_ptr());
  // What the optimizer gets: 2 layers x 7 linears x (A, B), PEFT names.
  auto params = stage.parameters();
  EXPECT_EQ(params.size(), 28u);
  for (auto& [name, t] : params) EXPECT_NE(name.find(".lora_"), std::string::npos) << name;
  for (auto& [name, t] : stage.policy().named_parameters()) EXPECT_FALSE(t.requires_grad()) << name;
  std::map<std::string, at::Tensor> base;
  for (auto& [name, t] : stage.policy().named_parameters()) base[name] = t.clone();
  EXPECT_GT(stage.frozen_bytes(), 0);

  train::Trainer(stage, train::trainer_options(r, r.run.dir, "{}\n", "dpo")).run();
  stage.after_final(r.run.dir);  // what the loop's caller does on rank 0 (final-merged/)

  auto loss = logged(r.run.dir, "loss");
  ASSERT_EQ(loss.size(), 3u);
  EXPECT_NEAR(loss[0], std::log(2.0), 1e-6) << "step 1 is computed before any update";
  EXPECT_GT(std::abs(loss[2] - std::log(2.0)), 1e-4) << "3 steps at lr 1e-2 did not move the adapters";
  // The base is untouched, bit for bit (the in-memory model and the folder it came from).
  for (auto& [name, t] : stage.policy().named_parameters()) EXPECT_TRUE(torch::equal(t, base.at(name))) << name;
  EXPECT_EQ(test::max_param_diff(test::folder_params(f.model_dir), base), 0.0);
  // Only the adapters have optimizer state.
  auto state = test::optimizer_state(r.run.dir + "/checkpoints/step-2");
  EXPECT_FALSE(state.empty());
  for (auto& [name, t] : state) EXPECT_NE(name.find(".lora_"), std::string::npos) << name;

  // final/: a PEFT adapter folder on model.path, loaded as base + merged adapter = the trained policy.
  const std::string fin = r.run.dir + "/final";
  ASSERT_TRUE(checkpoint::is_adapter_folder(fin));
  EXPECT_FALSE(path_exists(fin + "/model.safetensors"));
  auto cfg = checkpoint::read_adapter_config(fin);
  EXPECT_EQ(cfg.task_type, "CAUSAL_LM");
  EXPECT_EQ(cfg.r, 4);
  EXPECT_EQ(cfg.base_model, f.model_dir);
  auto saved = test::final_params(r.run.dir);
  EXPECT_EQ(saved.size(), 28u);
  double b_moved = 0;
  for (auto& [name, t] : saved)
    if (name.find("lora_B") != std::string::npos) b_moved = std::max(b_moved, t.abs().max().item<double>());
  EXPECT_GT(b_moved, 1e-4);
  auto loaded = model::Qwen2Model::from_pretrained(fin);
  auto merged = model::Qwen2Model::from_pretrained(r.run.dir + "/final-merged");
  PairBatch b = make_pair_batch(data::make_preference_batch(stage.train_set(), {0, 1, 2}), {0, 1, 2}, stage.pad_id());
  at::Tensor want = logits_of(stage.policy(), b);
  EXPECT_LT((logits_of(loaded, b) - want).abs().max().item<double>(), 1e-5);
  EXPECT_LT((logits_of(merged, b) - want).abs().max().item<double>(), 1e-5);
  EXPECT_GT((logits_of(stage.reference(), b) - want).abs().max().item<double>(), 1e-4);
}

TEST(DpoLora, KilledAndResumedEqualsUninterrupted) {
  at::set_num_threads(1);
  Fixture f;
  // 3 epochs of 9 pairs, 3 a micro-batch, 2 micro-batches a step -> 5 steps; dropout draws per step.
  const std::vector<std::string> ov{"dpo.precompute_ref_log_probs=false", "train.epochs=3", "checkpoint.every=2",
                                    "model.lora.dropout=0.1", "optim.lr=0.02"};
  DpoRecipe a;
  f.bind(a, f.dir.file("straight"), ov);
  // Each run seeds the global generator (the dropout masks' stream) as run_dpo does.
  {
    torch::manual_seed(3);
    DpoStage s(a, a.run.dir);
    train::Trainer(s, train::trainer_options(a, a.run.dir, "{}\n", "dpo")).run();
  }
  DpoRecipe b;
  f.bind(b, f.dir.file("crash"), ov);
  {
    torch::manual_seed(3);
    DpoStage s(b, b.run.dir);
    test::CrashingStage c(s, 7);  // step 4's first micro-batch; the last checkpoint is step 2's
    EXPECT_THROW(train::Trainer(c, train::trainer_options(b, b.run.dir, "{}\n", "dpo")).run(), test::Crash);
  }
  {
    torch::manual_seed(3);
    DpoStage s(b, b.run.dir);
    EXPECT_EQ(train::Trainer(s, train::trainer_options(b, b.run.dir, "{}\n", "dpo")).run(), 3);
  }
  auto la = logged(a.run.dir, "loss"), lb = logged(b.run.dir, "loss");
  ASSERT_EQ(la.size(), 5u);
  ASSERT_EQ(lb.size(), la.size());
  for (size_t i = 0; i < la.size(); ++i) EXPECT_EQ(lb[i], la[i]) << "step " << i + 1;
  auto fa = test::final_params(a.run.dir), fb = test::final_params(b.run.dir);
  EXPECT_EQ(fa.size(), 28u);
  EXPECT_EQ(test::max_param_diff(fa, fb), 0.0);
  EXPECT_GT(test::max_param_diff(fa, test::folder_params(a.run.dir + "/checkpoints/step-2")), 1e-5)
      << "steps 3-5 hardly moved the adapters";
}

TEST(DpoLora, PrecomputedReferenceEqualsLiveAndFollowsAnAdapterModelPath) {
  at::set_num_threads(1);
  Fixture f;
  DpoRecipe live_r, pre_r;
  f.bind(live_r, f.dir.file("live"), {"dpo.precompute_ref_log_probs=false"});
  f.bind(pre_r, f.dir.file("pre"), {"dpo.precompute_ref_log_probs=true", "dpo.precompute_ref_batch_size=2"});
  DpoStage live(live_r, live_r.run.dir), pre(pre_r, pre_r.run.dir);
  pre.set_rank(0, 1);
  ASSERT_TRUE(path_exists(pre.ref_cache_path()));
  // Move the adapters: the reference (adapters off) must not follow them.
  for (DpoStage* s : {&live, &pre}) {
    torch::NoGradGuard ng;
    torch::manual_seed(5);
    for (auto& [n, p] : s->parameters()) p.add_(torch::randn_like(p) * 0.05);
  }
  auto base = model::Qwen2Model::from_pretrained(f.model_dir);
  for (int i = 0; i < 3; ++i) {
    train::MicroBatch a = live.next_micro_batch(), b = pre.next_micro_batch();
    const PairBatch& pa = *static_cast<PairBatch*>(a.data.get());
    const PairBatch& pb = *static_cast<PairBatch*>(b.data.get());
    ASSERT_EQ(pa.rows, pb.rows);
    at::Tensor rl = live.ref_logps(pa), rp = pre.ref_logps(pb);
    EXPECT_LT((rl - rp).abs().max().item<double>(), 1e-5) << rl << rp;
    // The base model's own log-probs, and not the adapted policy's.
    torch::NoGradGuard ng;
    at::Tensor want = sequence_scores(base, pa, std::nullopt).logps;
    const int64_t P = static_cast<int64_t>(pa.rows.size());
    at::Tensor want2 = torch::stack({want.slice(0, 0, P), want.slice(0, P)}, 1);
    EXPECT_LT((rl - want2).abs().max().item<double>(), 1e-5);
    at::Tensor pol = sequence_scores(live.policy(), pa, std::nullopt).logps;
    EXPECT_GT((pol - want).abs().max().item<double>(), 1e-3) << "the adapters did not change the policy";
    EXPECT_NEAR(live.loss(a, 1).loss.item<double>(), pre.loss(b, 1).loss.item<double>(), 1e-5);
  }

  // model.path = an adapter folder (e.g. an SFT LoRA run's final/): the policy starts from its
  // merged model, and the (precomputed) reference is that merged model.
  const std::string ad = f.dir.file("sft-adapter");
  write_adapter(f.model_dir, ad, 11);
  DpoRecipe ar;
  f.bind(ar, f.dir.file("on-adapter"), {"model.path=\"" + ad + "\"", "dpo.precompute_ref_log_probs=true"});
  std::string cache;
  {
    DpoStage s(ar, ar.run.dir);
    s.set_rank(0, 1);
    cache = s.ref_cache_path();
    ASSERT_TRUE(path_exists(cache));
    train::MicroBatch mb = s.next_micro_batch();
    const PairBatch& pb = *static_cast<PairBatch*>(mb.data.get());
    auto merged = model::Qwen2Model::from_pretrained(ad);
    torch::NoGradGuard ng;
    at::Tensor want = sequence_scores(merged, pb, std::nullopt).logps;
    at::Tensor off = sequence_scores(base, pb, std::nullopt).logps;
    const int64_t P = static_cast<int64_t>(pb.rows.size());
    at::Tensor got = s.ref_logps(pb);
    EXPECT_LT((got - torch::stack({want.slice(0, 0, P), want.slice(0, P)}, 1)).abs().max().item<double>(), 1e-5);
    EXPECT_GT((want - off).abs().max().item<double>(), 1e-3) << "the adapter folder's model equals its base";
    EXPECT_NEAR(s.loss(mb, 1).loss.item<double>(), std::log(2.0), 1e-6);  // fresh B = 0 on the merged start
  }
  // The same adapter folder: the same cache; a rewritten adapter: another key (not stale log-probs).
  {
    DpoRecipe again;
    f.bind(again, f.dir.file("on-adapter"), {"model.path=\"" + ad + "\"", "dpo.precompute_ref_log_probs=true"});
    DpoStage s(again, again.run.dir);
    s.set_rank(0, 1);
    EXPECT_EQ(s.ref_cache_path(), cache);
  }
  write_adapter(f.model_dir, ad, 12);
  {
    DpoRecipe again;
    f.bind(again, f.dir.file("on-adapter"), {"model.path=\"" + ad + "\"", "dpo.precompute_ref_log_probs=true"});
    DpoStage s(again, again.run.dir);
    s.set_rank(0, 1);
    EXPECT_NE(s.ref_cache_path(), cache);
  }

  // dpo.ref_path set: that folder is loaded (a second model), as without LoRA.
  {
    DpoRecipe rr;
    f.bind(rr, f.dir.file("ref-path"), {"dpo.precompute_ref_log_probs=false", "dpo.ref_path=\"" + ad + "\""});
    DpoStage s(rr, rr.run.dir);
    EXPECT_NE(s.reference().embed_tokens_.data_ptr(), s.policy().embed_tokens_.data_ptr());
    train::MicroBatch mb = s.next_micro_batch();
    EXPECT_GT(std::abs(s.loss(mb, 1).loss.item<double>() - std::log(2.0)), 1e-4);  // policy != reference
  }
  // A reference that is no model folder is refused, naming the key and the reason.
  {
    DpoRecipe bad;
    make_dirs(f.dir.file("empty"));
    f.bind(bad, f.dir.file("bad"), {"dpo.ref_path=\"" + f.dir.file("empty") + "\""});
    try {
      DpoStage s(bad, bad.run.dir);
      ADD_FAILURE() << "an empty dpo.ref_path folder was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("dpo.ref_path) is not a model folder"), std::string::npos) << e.what();
    }
  }
}

// Every shipped dpo-lora.json binds (base chain, keys, values) with LoRA on and the LoRA learning rate
// (tests/config/shipped_recipes_test also runs `ptk dpo --check` on them).
TEST(DpoLora, ShippedRecipesBindWithLoraOn) {
  int n = 0;
  for (auto& e : std::filesystem::recursive_directory_iterator(test::source_dir() + "/recipes")) {
    if (e.path().filename() != "dpo-lora.json") continue;
    DpoRecipe r;
    ASSERT_NO_THROW(config::bind_recipe(config::load_recipe(e.path().string(), {}), r.all_sections())) << e.path();
    EXPECT_TRUE(r.lora.enabled) << e.path();
    EXPECT_EQ(r.lora.rank, 16) << e.path();
    EXPECT_TRUE(r.dpo.ref_path.empty()) << e.path() << ": the reference is the adapters-off policy";
    EXPECT_DOUBLE_EQ(r.optim.lr, 7e-6) << e.path();
    EXPECT_EQ(r.train.micro_batch_size * r.train.grad_accum, 128) << e.path() << ": 128 pairs a step on one GPU";
    ++n;
  }
  EXPECT_EQ(n, 4) << "recipes/qwen2.5-{0.5b,1.5b,3b,7b}/dpo-lora.json";
}

}  // namespace
}  // namespace ptk::rl
