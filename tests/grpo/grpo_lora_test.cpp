// The GRPO stage with model.lora (issue #28) on a tiny random Qwen2 (hidden 32, 2 layers, byte
// tokenizer), in process:
// - with beta > 0 the reference is the policy with its adapters off: the same base tensors (no copy),
//   whose log-probs equal the base model's (run.dir/base, the random init make_trainable wrote);
//   only lora_A/lora_B are trained and the base is bit-identical after training; final/ is a PEFT
//   adapter folder (CAUSAL_LM);
// - rollouts after an update use the updated adapters: at step 2 the engine's sampling log-probs
//   equal the trainer's forward (importance weights 1) while the policy is measurably away from the
//   base, and the engine reused its packed decode weights (the base never changes) instead of
//   repacking them;
// - with a trained weight the engine packs (an untied lm_head in modules_to_save) nothing is reused,
//   and the rollouts still come from the updated policy;
// - a run killed mid-run resumes bit for bit (losses, adapter tensors), LoRA dropout on.
// GRPO without LoRA: grpo_stage_test / grpo_invariants_test.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <sstream>

#include "core/checkpoint/adapter_config.h"
#include "core/config/recipe.h"
#include "core/kernels/cpu/packed_linear.h"
#include "core/model/qwen2.h"
#include "core/train/from_recipe.h"
#include "core/train/trainer.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "datasets/byte_tokenizer.h"
#include "rl/grpo_stage.h"
#include "tests/grpo/grpo_test_support.h"
#include "tests/support/crashing_stage.h"
#include "tests/support/run_folders.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_model_json.h"

namespace ptk::rl {
namespace {

using test_support::letters;
using test_support::options_for;
using test_support::plain_logprobs;

// Tokenizer, random-init model config (model.config), 12 prompts; LoRA rank 4 on every linear.
struct Fixture {
  test::TempDir d;
  Fixture() {
    tasks::write_byte_tokenizer(d.file("tok"));
    d.write("model.json", test::kTinyByteModelJson);
    d.write("train.jsonl", test_support::what_is_prompts());
  }
  std::unique_ptr<GrpoRecipe> recipe(const std::string& run, std::vector<std::string> overrides) {
    std::string file = d.write("grpo.json", "{\n"
        "\"run\": {\"seed\": 7, \"dir\": \"" + d.file(run) + "\"},\n"
        "\"model\": {\"config\": \"" + d.file("model.json") + "\", \"lora\": {\"enabled\": true, \"rank\": 4, "
        "\"alpha\": 8}},\n"
        "\"tokenizer\": {\"path\": \"" + d.file("tok") + "\"},\n"
        "\"data\": {\"train\": [\"" + d.file("train.jsonl") + "\"], \"max_seq_len\": 128},\n"
        "\"train\": {\"max_steps\": 2, \"micro_batch_size\": 4, \"grad_accum\": 2, \"eval_every\": 0},\n"
        "\"optim\": {\"lr\": 2e-2, \"warmup_steps\": 0},\n"
        "\"grpo\": {\"num_generations\": 4, \"max_completion_length\": 6, \"temperature\": 1.5, \"beta\": 0.04,\n"
        "           \"reward_funcs\": [\"letters\"]}\n}\n");
    return test_support::bind_recipe(file, overrides);
  }
};

std::vector<double> losses(const std::string& run_dir) {
  std::vector<double> out;
  for (auto& d : test::metric_docs(run_dir)) out.push_back(d["loss"].GetDouble());
  return out;
}

TEST(GrpoLora, AdaptersOffReferenceAndRolloutsWithTheUpdatedAdapters) {
  at::set_num_threads(1);
  Fixture f;
  // Importance weights per token, truncated far above 1: they show any gap between the engine's
  // sampling log-probs and the trainer's.
  auto r = f.recipe("run", {"grpo.vllm_importance_sampling_mode=\"token_truncate\"",
                            "grpo.vllm_importance_sampling_clip_max=100", "checkpoint.every=1"});
  GrpoStage stage(*r, r->run.dir, {}, letters());
  ASSERT_TRUE(stage.has_reference());
  auto params = stage.parameters();
  EXPECT_EQ(params.size(), 28u);  // 2 layers x 7 linears x (A, B)
  for (auto& [name, t] : params) EXPECT_NE(name.find(".lora_"), std::string::npos) << name;
  // The reference holds the policy's own base tensors.
  std::map<std::string, at::Tensor> policy_base;
  for (auto& [name, t] : stage.policy().named_parameters()) policy_base[name] = t;
  auto ref = stage.reference_parameters();
  ASSERT_EQ(ref.size(), policy_base.size());
  for (auto& [name, t] : ref) EXPECT_EQ(t.data_ptr(), policy_base.at(name).data_ptr()) << name;
  EXPECT_GT(stage.frozen_bytes(), 0);

  train::Trainer(stage, options_for(*r)).run();

  // Step 2's generation batch came after step 1's update, through the packed base weights kept
  // from step 1's generation and the adapters read live.
  const rollout::Stats& st = stage.last_rollout_stats();
  EXPECT_TRUE(st.packed_reused);
  // Where the CPU packs at all (AVX-512, fp32), what was reused is real packed weights.
  if (kernels::cpu::PackedLinear::supported(stage.policy().lm_head_weight())) {
    EXPECT_TRUE(st.packed_lm_head);
  }
  const GrpoLossInputs& in = stage.last_loss_inputs();  // step 2, pass 0
  const at::Tensor mask = in.batch.mask;
  ASSERT_GT(mask.sum().item<double>(), 0);
  const double T = r->grpo.temperature;
  // The policy step 2's batch was generated and scored with: step 1's checkpoint (base + adapter).
  auto base = model::Qwen2Model::from_pretrained(r->run.dir + "/base");
  auto step1 = model::Qwen2Model::from_pretrained(r->run.dir + "/checkpoints/step-1");
  at::Tensor lp_base = plain_logprobs(base, in, T).first, lp_policy = plain_logprobs(step1, in, T).first;
  EXPECT_LT(((in.batch.logps.detach() - lp_policy) * mask).abs().max().item<double>(), 2e-5);
  EXPECT_LT(((in.batch.ref_logps - lp_base) * mask).abs().max().item<double>(), 2e-5) << "the reference is not the base";
  EXPECT_GT(((lp_policy - lp_base) * mask).abs().max().item<double>(), 1e-3) << "one step did not move the policy";
  ASSERT_TRUE(in.batch.is_weights.defined());
  EXPECT_LT(((in.batch.is_weights - 1) * mask).abs().max().item<double>(), 1e-4)
      << "the rollouts' log-probs are not the updated policy's";

  // The base is untouched (bit for bit, against the folder it was written to); final/ is an adapter.
  std::map<std::string, at::Tensor> now;
  for (auto& [name, t] : stage.policy().named_parameters()) now[name] = t;
  EXPECT_EQ(test::max_param_diff(test::folder_params(r->run.dir + "/base"), now), 0.0);
  const std::string fin = r->run.dir + "/final";
  ASSERT_TRUE(checkpoint::is_adapter_folder(fin));
  auto cfg = checkpoint::read_adapter_config(fin);
  EXPECT_EQ(cfg.task_type, "CAUSAL_LM");
  EXPECT_EQ(cfg.base_model, r->run.dir + "/base");
  EXPECT_EQ(test::final_params(r->run.dir).size(), 28u);
}

// A trained weight the engine packs (here the untied lm_head as a module to save) must be re-packed for
// every generation batch: the rollouts then still sample from the updated policy.
TEST(GrpoLora, ATrainedOutputLayerIsRepackedEveryBatch) {
  at::set_num_threads(1);
  Fixture f;
  std::string untied = test::kTinyByteModelJson;
  const std::string tied = "\"tie_word_embeddings\": true";
  ASSERT_NE(untied.find(tied), std::string::npos);
  untied.replace(untied.find(tied), tied.size(), "\"tie_word_embeddings\": false");
  f.d.write("untied.json", untied);
  auto r = f.recipe("untied", {"model.config=" + f.d.file("untied.json"), "model.lora.modules_to_save=[\"lm_head\"]",
                               "grpo.vllm_importance_sampling_mode=\"token_truncate\"",
                               "grpo.vllm_importance_sampling_clip_max=100"});
  GrpoStage stage(*r, r->run.dir, {}, letters());
  EXPECT_EQ(stage.parameters().size(), 29u);  // 28 A/B + lm_head
  train::Trainer(stage, options_for(*r)).run();
  EXPECT_FALSE(stage.last_rollout_stats().packed_reused) << "a trained lm_head's packed copy was reused";
  const GrpoLossInputs& in = stage.last_loss_inputs();
  ASSERT_TRUE(in.batch.is_weights.defined());
  EXPECT_LT(((in.batch.is_weights - 1) * in.batch.mask).abs().max().item<double>(), 1e-4)
      << "the rollouts' log-probs are not the updated policy's";
}

TEST(GrpoLora, KilledAndResumedEqualsUninterrupted) {
  at::set_num_threads(1);
  Fixture f;
  // mu = 2: steps 1-2, 3-4, 5-6 train on three generation batches; checkpoints every 2 steps.
  const std::vector<std::string> ov = {"grpo.num_iterations=2", "train.max_steps=6", "checkpoint.every=2",
                                       "model.lora.dropout=0.1", "grpo.epsilon_high=0.28"};
  auto rr = f.recipe("ref", ov);
  {
    torch::manual_seed(7);  // as run_grpo: the dropout masks' stream
    GrpoStage s(*rr, rr->run.dir, {}, letters());
    train::Trainer(s, options_for(*rr)).run();
  }
  auto rc = f.recipe("crash", ov);
  {
    torch::manual_seed(7);  // as run_grpo: the dropout masks' stream
    GrpoStage s(*rc, rc->run.dir, {}, letters());
    test::CrashingStage c(s, 9);  // step 5's first micro-batch; the last checkpoint is step 4's
    EXPECT_THROW(train::Trainer(c, options_for(*rc)).run(), test::Crash);
  }
  {
    torch::manual_seed(7);  // as run_grpo: the dropout masks' stream
    GrpoStage s(*rc, rc->run.dir, {}, letters());
    EXPECT_EQ(train::Trainer(s, options_for(*rc)).run(), 2);
  }
  auto lr = losses(rr->run.dir), lc = losses(rc->run.dir);
  ASSERT_EQ(lr.size(), 6u);
  ASSERT_EQ(lc.size(), lr.size());
  for (size_t i = 0; i < lr.size(); ++i) EXPECT_EQ(lc[i], lr[i]) << "step " << i + 1;
  EXPECT_EQ(read_file(rc->run.dir + "/rollouts/step-5.jsonl"), read_file(rr->run.dir + "/rollouts/step-5.jsonl"));
  auto a = test::final_params(rr->run.dir), b = test::final_params(rc->run.dir);
  EXPECT_EQ(a.size(), 28u);
  EXPECT_EQ(test::max_param_diff(a, b), 0.0);
  EXPECT_GT(test::max_param_diff(a, test::folder_params(rr->run.dir + "/checkpoints/step-4")), 1e-5)
      << "steps 5-6 hardly moved the adapters";
}

// Every shipped grpo-lora.json binds with LoRA on, no dropout (rollouts sample without it) and the
// LoRA learning rate (tests/config/shipped_recipes_test also runs `ptk grpo --check` on them).
TEST(GrpoLora, ShippedRecipesBindWithLoraOn) {
  int n = 0;
  for (auto& e : std::filesystem::recursive_directory_iterator(test::source_dir() + "/recipes")) {
    if (e.path().filename() != "grpo-lora.json") continue;
    GrpoRecipe r;
    ASSERT_NO_THROW(config::bind_recipe(config::load_recipe(e.path().string(), {}), r.all_sections())) << e.path();
    EXPECT_NO_THROW(r.check()) << e.path();
    EXPECT_TRUE(r.lora.enabled) << e.path();
    EXPECT_EQ(r.lora.rank, 16) << e.path();
    EXPECT_EQ(r.lora.dropout, 0.0) << e.path();
    EXPECT_DOUBLE_EQ(r.optim.lr, 1e-5) << e.path();
    ++n;
  }
  EXPECT_EQ(n, 4) << "recipes/qwen2.5-{0.5b,1.5b,3b,7b}/grpo-lora.json";
}

}  // namespace
}  // namespace ptk::rl
