// One optimizer step of every stage with run.device=meta: SFT (packed and padded rows), DPO with a
// live reference and with cached reference log-probs, CPO, RM, and GRPO's loss on a prepared batch.
// Each stage is built the way its command builds it (a recipe bound from JSON, a tiny random model
// from a config.json or an HF folder, the byte tokenizer); the step is the trainer's: the
// micro-batches of one step, each loss divided by the step's target count and backward, clipping,
// and an AdamW update. The meta device holds shapes, not numbers: any tensor the step makes on the
// CPU while the model is on meta (a mask, an index, reference log-probs, advantages) fails the op
// that mixes them, and any read back to the host (.item(), nonzero, a copy to the CPU) throws.
// LossOut::read_back (the loop's once-per-step read) is not called: it is the host read.
// Not numbers (the stage tests check those on the CPU), not the loop's own metrics reads (part of
// Trainer::run).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "core/config/recipe.h"
#include "core/model/kv_cache.h"
#include "core/model/qwen2.h"
#include "core/optim/adamw.h"
#include "core/optim/clip.h"
#include "core/optim/zero2.h"
#include "core/parallel/comm.h"
#include "core/train/trainer.h"
#include "core/util/fs.h"
#include "datasets/byte_tokenizer.h"
#include "reward/rm_stage.h"
#include "rl/dpo_stage.h"
#include "rl/grpo_stage.h"
#include "rollout/device_loop.h"
#include "sft/sft_stage.h"
#include "tests/support/meta_kernels.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_model_json.h"

namespace ptk {
namespace {

struct Fixture {
  test::TempDir d;
  Fixture() {
    test::register_meta_kernels();  // the meta kernels LibTorch has only in Python
    tasks::write_byte_tokenizer(d.file("tok"));
    d.write("model.json", test::kTinyByteModelJson);
    std::string sft, pairs, prompts;
    for (int i = 0; i < 8; ++i) {
      const std::string q = "What is " + std::to_string(i) + " + " + std::to_string(2 * i) + "?";
      sft += "{\"prompt\": \"" + q + " \", \"completion\": \"It is " + std::to_string(3 * i) +
             (i % 2 ? "." : ", I think.") + "\"}\n";
      pairs += "{\"prompt\": \"" + q + " \", \"chosen\": \"" + std::to_string(3 * i) + (i % 3 ? "." : ", surely.") +
               "\", \"rejected\": \"" + std::to_string(3 * i + 7) + "\"}\n";
      prompts += "{\"prompt\": \"" + q + "\", \"answer\": \"" + std::to_string(3 * i) + "\"}\n";
    }
    d.write("sft.jsonl", sft);
    d.write("pairs.jsonl", pairs);
    d.write("prompts.jsonl", prompts);
  }
  // The shared keys: run.device=meta, the tiny random model, the byte tokenizer, `data`.
  std::vector<std::string> keys(const std::string& run, const std::string& data, std::vector<std::string> more = {}) {
    std::vector<std::string> k{"run.device=meta", "run.seed=3", "run.dir=" + d.file(run),
                               "model.config=" + d.file("model.json"), "tokenizer.path=" + d.file("tok"),
                               "data.train=[\"" + d.file(data) + "\"]", "data.max_seq_len=64",
                               "train.micro_batch_size=2", "train.grad_accum=2"};
    k.insert(k.end(), more.begin(), more.end());
    return k;
  }
  template <class Recipe>
  void bind(Recipe& r, const std::vector<std::string>& keys) {
    config::bind_recipe(config::load_recipe("", keys), r.all_sections());
  }
};

void expect_meta(const at::Tensor& t, const std::string& what) {
  ASSERT_TRUE(t.defined()) << what;
  EXPECT_TRUE(t.is_meta()) << what << " is on " << t.device();
}

// The trainer's step on `stage`: K micro-batches, each loss (÷ the step's targets) backward, the
// gradient norm clipped to 1 (optim::clip_grad_norm_tensor, as Trainer::run), AdamW.
void one_step(train::Stage& stage, int64_t K) {
  auto params = stage.parameters();
  ASSERT_FALSE(params.empty());
  for (auto& [name, p] : params) expect_meta(p, name);
  optim::AdamW adamw(params, optim::AdamWOptions{});
  std::vector<train::MicroBatch> mbs;
  int64_t targets = 0;
  for (int64_t k = 0; k < K; ++k) {
    mbs.push_back(stage.next_micro_batch());
    targets += mbs.back().targets;
  }
  for (auto& mb : mbs) {
    train::LossOut out = stage.loss(mb, static_cast<double>(std::max<int64_t>(targets, 1)));
    expect_meta(out.loss, "the loss");
    EXPECT_EQ(out.loss.dim(), 0);
    out.loss.backward();
  }
  int with_grad = 0;
  std::vector<at::Tensor> tensors;
  for (auto& [name, p] : params) {
    tensors.push_back(p);
    if (!p.grad().defined()) continue;
    ++with_grad;
    expect_meta(p.grad(), name + ".grad");
  }
  EXPECT_GT(with_grad, 0) << "no parameter got a gradient";
  expect_meta(optim::clip_grad_norm_tensor(tensors, 1.0), "the gradient norm");  // the loop's clipping
  adamw.step(1e-3);
  for (auto& [name, p] : params) expect_meta(p, name + " after the update");
}

// What the tests below rely on: an op mixing a meta tensor with a CPU one (here the kinds of tensor a
// step builds: an index, a mask, cached log-probs) throws, and so does a read back to the host.
TEST(MetaStep, MixingCpuTensorsIntoAMetaStepThrows) {
  test::register_meta_kernels();
  at::Tensor h = torch::empty({4, 3}, torch::device(torch::kMeta));
  EXPECT_ANY_THROW(h.index_select(0, torch::tensor({0, 2}, torch::kLong)));
  EXPECT_ANY_THROW(h * torch::ones({4, 3}));
  EXPECT_ANY_THROW(h.sum(1) - torch::zeros({4}));
  EXPECT_ANY_THROW(h.sum().item<double>());
  EXPECT_NO_THROW(h.index_select(0, torch::tensor({0, 2}, torch::kLong).to(torch::kMeta)));
}

TEST(MetaStep, SftPaddedAndPacked) {
  Fixture f;
  for (const char* packing : {"false", "true"}) {
    SCOPED_TRACE(std::string("data.packing=") + packing);
    sft::SftRecipe r;
    f.bind(r, f.keys(std::string("sft-") + packing, "sft.jsonl", {std::string("data.packing=") + packing}));
    parallel::Comm comm;
    auto stage = sft::make_sft_stage(r, r.run.dir, comm);
    one_step(*stage, 2);
  }
}

// ZeRO-2's step (train.sharding=zero2) at world size 1: gradients moved into buckets by its hooks,
// the shard, its norm and clipping, AdamW on the shard and the weights written back, all on the
// device.
TEST(MetaStep, SftWithZeroTwo) {
  Fixture f;
  sft::SftRecipe r;
  f.bind(r, f.keys("sft-zero2", "sft.jsonl", {"data.packing=true"}));
  parallel::Comm comm;
  auto stage = sft::make_sft_stage(r, r.run.dir, comm);
  auto params = stage->parameters();
  optim::Zero2AdamW zero2(comm, params, optim::AdamWOptions{}, /*bucket_mb=*/0.01);
  std::vector<train::MicroBatch> mbs{stage->next_micro_batch(), stage->next_micro_batch()};
  const double targets = static_cast<double>(std::max<int64_t>(mbs[0].targets + mbs[1].targets, 1));
  for (auto& mb : mbs) {
    zero2.begin_backward();
    train::LossOut out = stage->loss(mb, targets);
    expect_meta(out.loss, "the loss");
    out.loss.backward();
    zero2.end_backward();
  }
  EXPECT_GT(zero2.num_buckets(), 1);
  expect_meta(zero2.clip_grad_norm(1.0), "the gradient norm");
  zero2.step(1e-3);
  for (auto& [name, p] : params) expect_meta(p, name + " after the update");
}

// LoRA: the adapters (and the frozen base) on the device, and only the adapters trained.
TEST(MetaStep, SftLoraWithCheckpointingAndDropout) {
  Fixture f;
  sft::SftRecipe r;
  f.bind(r, f.keys("sft-lora", "sft.jsonl",
                   {"model.lora.enabled=true", "model.lora.rank=4", "model.lora.dropout=0.1",
                    "model.activation_checkpointing=true"}));
  parallel::Comm comm;
  auto stage = sft::make_sft_stage(r, r.run.dir, comm);
  EXPECT_EQ(stage->parameters().size(), 28u);  // 2 layers x 7 linears x (A, B)
  for (auto& [name, p] : stage->parameters()) EXPECT_NE(name.find("lora_"), std::string::npos) << name;
  one_step(*stage, 2);
}

TEST(MetaStep, DpoLiveReferenceAndCpo) {
  Fixture f;
  {
    rl::DpoRecipe r;
    f.bind(r, f.keys("dpo-live", "pairs.jsonl", {"dpo.precompute_ref_log_probs=false"}));
    rl::DpoStage stage(r, r.run.dir);
    ASSERT_FALSE(stage.precomputes_reference());
    expect_meta(stage.reference().named_parameters().front().second, "the reference");
    one_step(stage, 2);
  }
  {
    rl::DpoRecipe r;
    f.bind(r, f.keys("cpo", "pairs.jsonl", {"dpo.algorithm=cpo", "dpo.loss_type=sigmoid"}));
    rl::DpoStage stage(r, r.run.dir);
    one_step(stage, 2);
  }
}

// GRPO's prepared micro-batch for the meta-device steps: two prompts x two completions with their
// advantages (the stage fills log-probs and the reference's on its device).
train::MicroBatch grpo_batch(rl::GrpoStage& stage) {
  return stage.prepared_micro_batch({{72, 105, 63}, {72, 105, 63}, {50, 43, 50, 61}, {50, 43, 50, 61}},
                                    {{52, 258}, {53, 53, 46}, {52, 258}, {120}}, {0.5, -0.5, 1.0, -1.0});
}

// LoRA in the other stages: DPO's live reference and GRPO's are the policy with its adapters off;
// the RM trains its score head with the adapters.

TEST(MetaStep, LoraDpoRmAndGrpo) {
  Fixture f;
  const std::vector<std::string> lora{"model.lora.enabled=true", "model.lora.rank=4"};
  auto with = [&](std::vector<std::string> more) {
    more.insert(more.end(), lora.begin(), lora.end());
    return more;
  };
  {
    rl::DpoRecipe r;
    f.bind(r, f.keys("dpo-lora", "pairs.jsonl", with({"dpo.precompute_ref_log_probs=false"})));
    rl::DpoStage stage(r, r.run.dir);
    ASSERT_FALSE(stage.precomputes_reference());
    EXPECT_FALSE(stage.reference().has_adapters());
    EXPECT_TRUE(stage.policy().has_adapters());
    EXPECT_EQ(stage.parameters().size(), 28u);
    one_step(stage, 2);
  }
  {
    reward::RmRecipe r;
    f.bind(r, f.keys("rm-lora", "pairs.jsonl", with({})));
    auto stage = reward::make_rm_stage(r, r.run.dir, parallel::Comm());
    EXPECT_EQ(stage->parameters().size(), 29u);  // 28 A/B + the score head
    one_step(*stage, 2);
  }
  {
    rl::GrpoRecipe r;
    f.bind(r, f.keys("grpo-lora", "prompts.jsonl",
                     with({"train.micro_batch_size=4", "train.grad_accum=1", "grpo.num_generations=4", "grpo.beta=0.04",
                           "grpo.max_completion_length=8", "grpo.reward_funcs=[\"math\"]"})));
    rl::GrpoStage stage(r, r.run.dir);
    ASSERT_TRUE(stage.has_reference());
    auto params = stage.parameters();
    EXPECT_EQ(params.size(), 28u);
    optim::AdamW adamw(params, optim::AdamWOptions{});
    train::MicroBatch mb = grpo_batch(stage);
    train::LossOut out = stage.loss(mb, static_cast<double>(mb.targets));
    expect_meta(out.loss, "the loss");
    out.loss.backward();
    int with_grad = 0;
    for (auto& [name, p] : params)
      if (p.grad().defined()) expect_meta(p.grad(), name + ".grad"), ++with_grad;
    EXPECT_GT(with_grad, 0);
    adamw.step(1e-3);
    for (auto& [name, p] : params) expect_meta(p, name);
  }
}

// The cache is written by a CPU run of the same recipe (its key is the reference and the data, not
// the device); the meta stage reads it and moves it to its device.
TEST(MetaStep, DpoCachedReference) {
  Fixture f;
  const std::string run = "dpo-cached";
  {
    rl::DpoRecipe cpu;
    f.bind(cpu, f.keys(run, "pairs.jsonl", {"run.device=cpu", "dpo.precompute_ref_log_probs=true"}));
    rl::DpoStage stage(cpu, cpu.run.dir);
    stage.set_rank(0, 1);  // computes and writes the cache
    ASSERT_TRUE(path_exists(stage.ref_cache_path()));
  }
  rl::DpoRecipe r;
  f.bind(r, f.keys(run, "pairs.jsonl", {"dpo.precompute_ref_log_probs=true"}));
  rl::DpoStage stage(r, r.run.dir);
  stage.set_rank(0, 1);
  ASSERT_TRUE(stage.precomputes_reference());
  one_step(stage, 2);
}

TEST(MetaStep, RewardModel) {
  Fixture f;
  reward::RmRecipe r;
  f.bind(r, f.keys("rm", "pairs.jsonl", {"rm.center_rewards_coefficient=0.01"}));
  auto stage = reward::make_rm_stage(r, r.run.dir, parallel::Comm());
  one_step(*stage, 2);
}

// Rollouts need real numbers: the micro-batch is a prepared one (prompt and completion ids,
// advantages), as generation would hand it to the loss; with a reference (beta) and the
// importance-sampling correction (on by default).
// The rollout engine's device-loop step (rollout::DeviceLoop's body): the fixed-shape decode step over
// the KV cache and the tensor-op sampler with top-k / top-p, everything on the model's device.
TEST(MetaStep, DeviceLoopDecodeStepAndSampling) {
  Fixture f;
  rl::GrpoRecipe r;
  f.bind(r, f.keys("grpo-decode", "prompts.jsonl", {"grpo.num_generations=4", "grpo.reward_funcs=[\"math\"]"}));
  rl::GrpoStage stage(r, r.run.dir);
  const model::Qwen2Model& m = stage.policy();
  const at::Device meta(at::kMeta);
  const int64_t n = 4;
  model::KVCache cache(m.config(), 8, 64, m.embed_tokens_.scalar_type(), meta);
  auto [inv_freq, scale] = model::rope_inv_freq(m.config());
  const auto longs = torch::TensorOptions().dtype(torch::kLong).device(meta);
  at::Tensor logits = m.decode_step(torch::empty({n}, longs), torch::empty({n}, longs), inv_freq.to(meta), scale, cache,
                                    /*kv_len=*/32);
  expect_meta(logits, "the decode step's logits");
  EXPECT_EQ(logits.sizes(), (std::vector<int64_t>{n, m.config().vocab_size}));
  rollout::RowSampling rs;
  rs.inv_temperature = torch::empty({n}, torch::TensorOptions().dtype(torch::kFloat).device(meta));
  rs.greedy = torch::empty({n}, torch::TensorOptions().dtype(torch::kBool).device(meta));
  rs.top_k = torch::empty({n}, longs);
  rs.top_p = torch::empty({n}, torch::TensorOptions().dtype(torch::kDouble).device(meta));
  rs.uniform = rollout::sample_uniform_tensor(torch::empty({n}, longs), torch::empty({n}, longs),
                                              torch::empty({n}, longs));
  expect_meta(rs.uniform, "the uniforms");
  rollout::Drawn d = rollout::sample_rows_tensor(logits, rs, m.config().vocab_size - 3, /*filters=*/true);
  expect_meta(d.ids, "the drawn ids");
  expect_meta(d.logprobs, "the drawn log-probs");
}

TEST(MetaStep, GrpoLossOnAPreparedBatch) {
  Fixture f;
  rl::GrpoRecipe r;
  f.bind(r, f.keys("grpo", "prompts.jsonl",
                   {"train.micro_batch_size=4", "train.grad_accum=1", "grpo.num_generations=4", "grpo.beta=0.04",
                    "grpo.max_completion_length=8", "grpo.reward_funcs=[\"math\"]"}));
  for (const char* loss_type : {"dapo", "grpo"}) {
    SCOPED_TRACE(loss_type);
    r.grpo.loss_type = loss_type;
    rl::GrpoStage stage(r, r.run.dir);
    ASSERT_TRUE(stage.has_reference());
    auto params = stage.parameters();
    optim::AdamW adamw(params, optim::AdamWOptions{});
    train::MicroBatch mb = grpo_batch(stage);
    train::LossOut out = stage.loss(mb, static_cast<double>(mb.targets));
    expect_meta(out.loss, "the loss");
    out.loss.backward();
    for (auto& [name, p] : params)
      if (p.grad().defined()) p.grad().mul_(0.5);
    adamw.step(1e-3);
    for (auto& [name, p] : params) expect_meta(p, name);
  }
}

// grpo.reference_device=host: the reference stays on the CPU (host memory) while the policy is on
// meta; the prepared batch's reference pass uploads it to the policy's device and its log-probs are
// made there (a CPU forward mixed with the meta batch would fail); the host copy stays on the CPU.
TEST(MetaStep, GrpoReferenceOnHost) {
  Fixture f;
  rl::GrpoRecipe r;
  f.bind(r, f.keys("grpo-host", "prompts.jsonl",
                   {"train.micro_batch_size=4", "train.grad_accum=1", "grpo.num_generations=4", "grpo.beta=0.04",
                    "grpo.max_completion_length=8", "grpo.reward_funcs=[\"math\"]", "grpo.reference_device=host"}));
  rl::GrpoStage stage(r, r.run.dir);
  ASSERT_TRUE(stage.has_reference());
  ASSERT_TRUE(stage.reference_on_host());
  for (auto& [name, t] : stage.reference_parameters()) EXPECT_TRUE(t.device().is_cpu()) << name << " is on " << t.device();
  for (auto& [name, t] : stage.parameters()) expect_meta(t, name);
  EXPECT_EQ(stage.reference_uploads(), 0);
  train::MicroBatch mb = grpo_batch(stage);
  EXPECT_EQ(stage.reference_uploads(), 1);
  train::LossOut out = stage.loss(mb, static_cast<double>(mb.targets));
  expect_meta(out.loss, "the loss");
  expect_meta(stage.last_loss_inputs().batch.ref_logps, "the reference log-probs");
  for (auto& [name, t] : stage.reference_parameters()) EXPECT_TRUE(t.device().is_cpu()) << name;
}

}  // namespace
}  // namespace ptk
