// The GRPO stage on a tiny random Qwen2 with the byte tokenizer: its loss equals grpo_loss on
// log-probs recomputed from plain full logits; at mu = 1 the ratio is exactly 1; the reference never
// changes and beta 0 loads none; rollouts/step-N.jsonl is written; a killed run resumes bit-for-bit.
// Not the loss formulas themselves (tests/rl_losses checks those against docs/FORMULAS.md).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <chrono>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include "core/config/recipe.h"
#include "core/model/qwen2.h"
#include "core/train/from_recipe.h"
#include "core/train/trainer.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "datasets/byte_tokenizer.h"
#include "rl/grpo_loss.h"
#include "reward/reward_server.h"
#include "rl/grpo_stage.h"
#include "tests/grpo/grpo_test_support.h"
#include "tests/support/crashing_stage.h"
#include "tests/support/reward_server_thread.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_model_json.h"

namespace ptk::rl {
namespace {

using test_support::letters;
using test_support::options_for;
using test_support::plain_logprobs;

// A fixture folder: tokenizer, model config, 12 training and 4 eval prompts.
struct Fixture {
  test::TempDir d;
  Fixture() {
    tasks::write_byte_tokenizer(d.file("tok"));
    d.write("model.json", test::kTinyByteModelJson);
    std::string train = test_support::what_is_prompts(), eval;
    for (int i = 0; i < 4; ++i)
      eval += "{\"prompt\": \"" + std::to_string(i) + " + 2 =\", \"answer\": \"" + std::to_string(i + 2) + "\"}\n";
    d.write("train.jsonl", train);
    d.write("eval.jsonl", eval);
  }
  // A recipe with `overrides` applied (key=value, as on the command line).
  std::unique_ptr<GrpoRecipe> recipe(const std::string& run, std::vector<std::string> overrides) {
    std::string file = d.write("grpo.json", "{\n"
        "\"run\": {\"seed\": 7, \"dir\": \"" + d.file(run) + "\"},\n"
        "\"model\": {\"config\": \"" + d.file("model.json") + "\"},\n"
        "\"tokenizer\": {\"path\": \"" + d.file("tok") + "\"},\n"
        "\"data\": {\"train\": [\"" + d.file("train.jsonl") + "\"], \"eval\": [\"" + d.file("eval.jsonl") + "\"], "
        "\"max_seq_len\": 128},\n"
        "\"train\": {\"max_steps\": 2, \"micro_batch_size\": 4, \"grad_accum\": 2},\n"
        "\"optim\": {\"lr\": 1e-2, \"warmup_steps\": 0},\n"
        "\"grpo\": {\"num_generations\": 4, \"max_completion_length\": 6, \"temperature\": 1.5,\n"
        "           \"reward_funcs\": [\"letters\"], \"eval_max_prompts\": 4}\n}\n");
    return test_support::bind_recipe(file, overrides);
  }
};

TEST(GrpoStage, LossEqualsGrpoLossOnPlainLogprobs) {
  at::set_num_threads(1);
  for (const char* lt : {"grpo", "bnpo", "dr_grpo", "dapo"}) {
    Fixture f;
    auto r = f.recipe("run", {std::string("grpo.loss_type=") + lt, "grpo.beta=0.04", "grpo.epsilon_high=0.28"});
    GrpoStage stage(*r, r->run.dir, {}, letters());
    ASSERT_TRUE(stage.has_reference());
    // Both micro-batches of the step, as the loop would: N = their summed targets.
    auto a = stage.next_micro_batch(), b = stage.next_micro_batch();
    const double n = static_cast<double>(a.targets + b.targets);
    auto out = stage.loss(a, n);
    const auto& in = stage.last_loss_inputs();
    EXPECT_EQ(in.pass, 0);
    ASSERT_GT(in.batch.advantages.abs().sum().item<double>(), 0) << "rewards without spread: a useless test";
    auto [lp, ent] = plain_logprobs(stage.policy(), in, r->grpo.temperature);
    auto mask = in.batch.mask;
    EXPECT_LT(((in.batch.logps - lp) * mask).abs().max().item<double>(), 2e-5) << lt;
    EXPECT_LT(((in.batch.entropy - ent) * mask).abs().max().item<double>(), 5e-5) << lt;
    // The reference is a clone of the start weights, so ℓ^ref = ℓ here.
    EXPECT_LT(((in.batch.ref_logps - lp) * mask).abs().max().item<double>(), 2e-5) << lt;
    GrpoMicroBatch mb = in.batch;
    mb.logps = lp;
    mb.entropy = ent;
    mb.ref_logps = lp.clone();
    auto expect = grpo_loss(mb, in.options, in.scaling);
    EXPECT_NEAR(out.loss.item<double>(), expect.loss.item<double>(), 1e-6) << lt;
    // The scaling the stage chose: dapo divides by the step's N; the others by K (one rank).
    if (std::string(lt) == "dapo") EXPECT_EQ(in.scaling.num_items_in_batch, n);
    else EXPECT_EQ(in.scaling.accumulation_steps, 2);
  }
}

TEST(GrpoStage, RatioIsExactlyOneAtMu1AndOldLogprobsAreThePass0Ones) {
  at::set_num_threads(1);
  Fixture f;
  auto r = f.recipe("run", {"grpo.vllm_importance_sampling_correction=false", "grpo.num_iterations=2",
                            "train.grad_accum=1", "train.micro_batch_size=8"});
  GrpoStage stage(*r, r->run.dir, {}, letters());
  EXPECT_FALSE(stage.has_reference());
  auto mb0 = stage.next_micro_batch();
  auto out0 = stage.loss(mb0, static_cast<double>(mb0.targets));
  const auto in0 = stage.last_loss_inputs();
  // Pass 0: ℓ^old is the detached ℓ itself, so r = exp(ℓ − ℓ) = 1 and, with beta 0 and dapo,
  // loss = −Σ m·A / N exactly; nothing is clipped.
  EXPECT_FALSE(in0.batch.old_logps.defined());
  double expect = -(in0.batch.mask * in0.batch.advantages.unsqueeze(1)).sum().item<double>() / mb0.targets;
  EXPECT_NEAR(out0.loss.item<double>(), expect, 1e-7);
  ASSERT_TRUE(out0.read_back);
  out0.read_back(out0);  // what the loop does once per step
  EXPECT_FALSE(out0.ratios.empty());
  for (auto& rt : out0.ratios) {
    if (rt.name.rfind("clip_ratio/", 0) == 0) {
      EXPECT_EQ(rt.num, 0) << rt.name;
    }
  }
  // Pass 1 (no update in between here): ℓ^old = pass 0's ℓ, the same forward, so again r ≡ 1.
  auto mb1 = stage.next_micro_batch();
  auto out1 = stage.loss(mb1, static_cast<double>(mb1.targets));
  const auto& in1 = stage.last_loss_inputs();
  EXPECT_EQ(in1.pass, 1);
  ASSERT_TRUE(in1.batch.old_logps.defined());
  EXPECT_TRUE(torch::equal(in1.batch.old_logps, in0.batch.logps));
  EXPECT_TRUE(torch::equal(in1.batch.logps, in0.batch.logps));
  EXPECT_EQ(out1.loss.item<double>(), out0.loss.item<double>());
}

TEST(GrpoStage, ReferenceNeverChangesAndRolloutsAreWritten) {
  at::set_num_threads(1);
  Fixture f;
  auto r = f.recipe("run", {"grpo.beta=0.1", "train.max_steps=3"});
  GrpoStage stage(*r, r->run.dir, {}, letters());
  ASSERT_TRUE(stage.has_reference());
  std::vector<at::Tensor> before, policy_before;
  for (auto& [n, t] : stage.reference_parameters()) before.push_back(t.clone());
  for (auto& [n, t] : stage.parameters()) policy_before.push_back(t.clone());
  train::Trainer(stage, options_for(*r)).run();
  auto ref = stage.reference_parameters();
  auto pol = stage.parameters();
  double moved = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    EXPECT_TRUE(torch::equal(ref[i].second, before[i])) << ref[i].first;
    moved = std::max(moved, (pol[i].second - policy_before[i]).abs().max().item<double>());
  }
  EXPECT_GT(moved, 0) << "the policy did not train";
  // rollouts/step-N.jsonl: one line per completion of the generation batch (4 * 2 here).
  for (int step : {1, 2, 3}) {
    std::string file = r->run.dir + "/rollouts/step-" + std::to_string(step) + ".jsonl";
    ASSERT_TRUE(path_exists(file)) << file;
    std::istringstream in(read_file(file));
    std::string line;
    int lines = 0;
    while (std::getline(in, line)) {
      auto d = json::parse(line, file);
      for (const char* k : {"prompt", "completion", "answer", "rewards", "reward", "advantage", "finish_reason"})
        EXPECT_TRUE(d.HasMember(k)) << k << " in " << line;
      EXPECT_TRUE(d["rewards"].HasMember("letters")) << line;
      EXPECT_NE(std::string(d["prompt"].GetString()).find("What is"), std::string::npos) << line;
      ++lines;
    }
    EXPECT_EQ(lines, 8);
  }
  // Metrics carry TRL's names.
  std::string metrics = read_file(r->run.dir + "/metrics.jsonl");
  for (const char* k : {"\"reward\"", "\"reward_std\"", "\"rewards/letters/mean\"", "\"rewards/letters/std\"",
                        "\"frac_reward_zero_std\"", "\"kl\"", "\"entropy\"", "\"clip_ratio/low_mean\"",
                        "\"clip_ratio/high_mean\"", "\"clip_ratio/region_mean\"", "\"completions/mean_length\"",
                        "\"completions/max_length\"", "\"completions/clipped_ratio\"", "\"time/generate_s\"",
                        "\"time/score_s\"", "\"generation/tokens_per_s\"", "\"eval/accuracy\"",
                        "\"sampling/importance_sampling_ratio/mean\""})
    EXPECT_NE(metrics.find(k), std::string::npos) << k;
}

TEST(GrpoStage, BadRecipesFailWithTheKeys) {
  Fixture f;
  auto r = f.recipe("run", {"train.micro_batch_size=3", "train.grad_accum=1"});
  try {
    GrpoStage s(*r, r->run.dir, {}, letters());
    FAIL() << "accepted 3 completions per step with G = 4";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("grpo.num_generations"), std::string::npos) << e.what();
  }
  auto r2 = f.recipe("run", {"grpo.reward_funcs=[\"maths\"]"});
  try {
    GrpoStage s(*r2, r2->run.dir, {}, letters());
    FAIL() << "accepted an unknown reward function";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("grpo.reward_funcs"), std::string::npos) << e.what();
  }
}


// grpo.eval_num_samples adds eval/sampled_accuracy (samples as training draws them, a fixed seed per
// held-out prompt): two evals of the same weights score the same draws; the greedy figures do not
// change with it; 0 logs no sampled figure.
TEST(GrpoStage, SampledHeldoutAccuracyIsReproducible) {
  at::set_num_threads(1);
  Fixture f;
  auto get = [](const Metrics& m, const std::string& k) {
    for (const auto& [name, v] : m.values())
      if (name == k) return v;
    return -1.0;
  };
  auto r0 = f.recipe("run0", {});
  GrpoStage plain(*r0, r0->run.dir, {}, letters());
  Metrics m0;
  plain.evaluate_accuracy(&m0);
  EXPECT_EQ(get(m0, "sampled_accuracy"), -1.0) << "eval_num_samples 0 logged a sampled accuracy";
  ASSERT_GE(get(m0, "accuracy"), 0.0);

  auto r = f.recipe("run1", {"grpo.eval_num_samples=16"});
  GrpoStage stage(*r, r->run.dir, {}, letters());
  Metrics a, b;
  stage.evaluate_accuracy(&a);
  stage.evaluate_accuracy(&b);
  const double sa = get(a, "sampled_accuracy");
  ASSERT_GE(sa, 0.0) << "no eval/sampled_accuracy with grpo.eval_num_samples=16";
  EXPECT_LE(sa, 1.0);
  EXPECT_EQ(sa, get(b, "sampled_accuracy")) << "the same weights scored different draws";
  EXPECT_EQ(get(a, "accuracy"), get(m0, "accuracy")) << "sampling changed the greedy figure";
  EXPECT_EQ(get(a, "completions/mean_length"), get(m0, "completions/mean_length"));
}


// A step end to end against a live reward server: the `remote` source is the server's math reward,
// which equals the in-process math verifier on every completion; a server that goes away fails the
// step with an error naming grpo.reward_urls (never a zero reward).
TEST(GrpoStage, StepAgainstALoopbackRewardServer) {
  at::set_num_threads(1);
  Fixture f;
  // A `ptk reward-server` on a loopback port, in-process, serving the math verifier.
  test::RewardServerThread srv(test::reward_section({"reward.verifiers=[\"math\"]"}));
  auto r = f.recipe("run", {"grpo.reward_funcs=[\"math\", \"letters\"]", "grpo.reward_urls=[\"" + srv.url() + "\"]",
                            "grpo.remote_reward_weight=0.5", "train.max_steps=1"});
  GrpoStage stage(*r, r->run.dir, {}, letters());
  train::Trainer(stage, options_for(*r)).run();
  std::istringstream in(read_file(r->run.dir + "/rollouts/step-1.jsonl"));
  std::string line;
  int lines = 0;
  while (std::getline(in, line)) {
    auto d = json::parse(line, "rollout");
    ASSERT_TRUE(d["rewards"].HasMember("remote")) << line;
    EXPECT_EQ(d["rewards"]["remote"].GetDouble(), d["rewards"]["math"].GetDouble()) << line;
    EXPECT_NEAR(d["reward"].GetDouble(),
                d["rewards"]["math"].GetDouble() + d["rewards"]["letters"].GetDouble() +
                    0.5 * d["rewards"]["remote"].GetDouble(), 1e-12) << line;
    ++lines;
  }
  EXPECT_EQ(lines, 8);
  std::string metrics = read_file(r->run.dir + "/metrics.jsonl");
  EXPECT_NE(metrics.find("\"rewards/remote/mean\""), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("\"rewards/remote/math/mean\""), std::string::npos) << metrics;
  // The server goes away: the next generation fails after the client's retries, naming the key.
  srv.stop();
  auto r2 = f.recipe("run2", {"grpo.reward_urls=[\"" + srv.url() + "\"]", "grpo.reward_max_attempts=2",
                             "grpo.reward_timeout_s=2"});
  GrpoStage s2(*r2, r2->run.dir, {}, letters());
  try {
    s2.next_micro_batch();
    FAIL() << "a dead reward server did not fail the step";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("grpo.reward_urls"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("resume=auto"), std::string::npos) << e.what();
  }
}

struct RolloutLine {
  int64_t row;
  std::string answer;
  double reward;
};
std::vector<RolloutLine> rollouts(const std::string& file) {
  std::vector<RolloutLine> out;
  std::istringstream in(read_file(file));
  std::string line;
  while (std::getline(in, line)) {
    auto d = json::parse(line, file);
    out.push_back({d["row"].GetInt64(), d["answer"].GetString(), d["reward"].GetDouble()});
  }
  return out;
}

// DAPO's dynamic sampling: groups whose rewards are all equal (here: every prompt with an odd
// answer scores a constant) are dropped and refilled, so every trained group has spread.
TEST(GrpoStage, DynamicSamplingDropsZeroStdGroups) {
  at::set_num_threads(1);
  Fixture f;
  auto r = f.recipe("run", {"grpo.dynamic_sampling=true", "grpo.dynamic_sampling_max_rounds=8", "train.max_steps=3",
                            "grpo.reward_funcs=[\"odd_constant\"]"});
  auto letter_share = letters()[0].fn;
  std::vector<RewardFunction> odd = {{"odd_constant", [letter_share](const std::string& c, const std::string& a) {
                                        return std::stoi(a) % 2 ? 1.0 : letter_share(c, a);
                                      }}};
  GrpoStage stage(*r, r->run.dir, {}, odd);
  train::Trainer(stage, options_for(*r)).run();
  for (int step : {1, 2, 3}) {
    auto lines = rollouts(r->run.dir + "/rollouts/step-" + std::to_string(step) + ".jsonl");
    ASSERT_EQ(lines.size(), 8u);
    for (auto& l : lines) EXPECT_EQ(std::stoi(l.answer) % 2, 0) << "step " << step << " kept row " << l.row;
  }
  std::istringstream in(read_file(r->run.dir + "/metrics.jsonl"));
  std::string line;
  while (std::getline(in, line)) {
    auto d = json::parse(line, "metrics");
    EXPECT_EQ(d["frac_reward_zero_std"].GetDouble(), 0.0) << line;
    EXPECT_LE(d["dynamic_sampling/kept_group_ratio"].GetDouble(), 1.0) << line;
    EXPECT_EQ(d["dynamic_sampling/short_groups"].GetDouble(), 0.0) << line;
  }
}

// The Qwen2.5 report's order: from the second epoch, the prompts whose group rewards varied most
// at their last visit come first.
TEST(GrpoStage, VarianceFirstOrdersTheNextEpoch) {
  at::set_num_threads(1);
  Fixture f;
  // 12 prompts, 2 per generation batch: steps 1-6 are epoch 1, step 7 starts epoch 2.
  auto r = f.recipe("run", {"grpo.prompt_order=variance_first", "train.max_steps=7"});
  GrpoStage stage(*r, r->run.dir, {}, letters());
  train::Trainer(stage, options_for(*r)).run();
  std::map<int64_t, std::vector<double>> by_row;
  for (int step = 1; step <= 6; ++step)
    for (auto& l : rollouts(r->run.dir + "/rollouts/step-" + std::to_string(step) + ".jsonl"))
      by_row[l.row].push_back(l.reward);
  ASSERT_EQ(by_row.size(), 12u);
  std::vector<std::pair<double, int64_t>> var;
  for (auto& [row, rs] : by_row) {
    double mean = 0, v = 0;
    for (double x : rs) mean += x / rs.size();
    for (double x : rs) v += (x - mean) * (x - mean) / (rs.size() - 1);
    var.push_back({v, row});
  }
  std::sort(var.rbegin(), var.rend());
  std::set<int64_t> top = {var[0].second, var[1].second}, got;
  for (auto& l : rollouts(r->run.dir + "/rollouts/step-7.jsonl")) got.insert(l.row);
  EXPECT_EQ(got, top);
}

std::vector<double> losses(const std::string& run_dir) {
  std::vector<double> out;
  std::istringstream in(read_file(run_dir + "/metrics.jsonl"));
  std::string line;
  while (std::getline(in, line)) out.push_back(json::parse(line, "metrics")["loss"].GetDouble());
  return out;
}

TEST(GrpoStage, ResumeAfterAKillIsBitForBit) {
  at::set_num_threads(1);
  Fixture f;
  // mu = 2, two micro-batches a step, 12 prompts = 6 generation batches of 2 prompts per epoch =
  // 12 steps; 14 steps cross the epoch boundary (step 13); checkpoints every 2 steps; variance-first
  // ordering from epoch 2. (Resuming inside epoch 2, and the optimizer state itself:
  // grpo_invariants_test.cpp.)
  std::vector<std::string> ov = {"grpo.num_iterations=2", "train.max_steps=14", "checkpoint.every=2",
                                 "grpo.prompt_order=variance_first", "grpo.beta=0.05", "train.eval_every=0",
                                 "grpo.epsilon_high=0.28"};
  auto ov_ref = ov;
  ov_ref.push_back("train.micro_batch_size=4");
  auto rr = f.recipe("ref", ov_ref);
  {
    GrpoStage s(*rr, rr->run.dir, {}, letters());
    train::Trainer(s, options_for(*rr)).run();
  }
  auto lref = losses(rr->run.dir);
  ASSERT_EQ(lref.size(), 14u);
  auto rc = f.recipe("crash", ov_ref);
  {
    GrpoStage s(*rc, rc->run.dir, {}, letters());
    test::CrashingStage c(s, 11);  // step 6's first micro-batch (pass 2 of step 5's batch); last checkpoint: step 4
    EXPECT_THROW(train::Trainer(c, options_for(*rc)).run(), test::Crash);
  }
  {
    GrpoStage s(*rc, rc->run.dir, {}, letters());
    EXPECT_EQ(train::Trainer(s, options_for(*rc)).run(), 10);
  }
  auto l = losses(rc->run.dir);
  ASSERT_EQ(l.size(), lref.size());
  for (size_t i = 0; i < l.size(); ++i) EXPECT_EQ(l[i], lref[i]) << "step " << i + 1;
  for (int step : {7, 13})
    EXPECT_EQ(read_file(rc->run.dir + "/rollouts/step-" + std::to_string(step) + ".jsonl"),
              read_file(rr->run.dir + "/rollouts/step-" + std::to_string(step) + ".jsonl")) << step;
  auto a = checkpoint::read_checkpoint_tensors(rr->run.dir + "/final");
  auto b = checkpoint::read_checkpoint_tensors(rc->run.dir + "/final");
  for (auto& [name, t] : a) EXPECT_TRUE(torch::equal(t, b.at(name))) << name;
}

// grpo.reference_device=host: the reference lives in host memory and is uploaded for each
// generation batch's reference pass. On the CPU host memory is the device's, so the run must be the
// same number for number as with the reference on the device; the upload path is taken once per
// generation batch (mu = 2: 2 batches in 4 steps). Every step logs its phases; the reference phase
// comes with the generation batch, the update with every step.
TEST(GrpoStage, ReferenceOnHostGivesTheSameRun) {
  at::set_num_threads(1);
  Fixture f;
  std::vector<std::string> ov = {"grpo.beta=0.1", "train.max_steps=4", "grpo.num_iterations=2", "train.eval_every=0"};
  std::map<std::string, std::string> dirs;
  for (const char* where : {"same", "host"}) {
    SCOPED_TRACE(where);
    auto o = ov;
    o.push_back(std::string("grpo.reference_device=") + where);
    auto r = f.recipe(std::string("ref-") + where, o);
    GrpoStage stage(*r, r->run.dir, {}, letters());
    ASSERT_TRUE(stage.has_reference());
    EXPECT_EQ(stage.reference_on_host(), std::string(where) == "host");
    train::Trainer(stage, options_for(*r)).run();
    EXPECT_EQ(stage.reference_uploads(), std::string(where) == "host" ? 2 : 0);
    for (auto& [n, t] : stage.reference_parameters()) EXPECT_TRUE(t.device().is_cpu()) << n;
    dirs[where] = r->run.dir;
  }
  auto rows = [](const std::string& dir) {
    std::vector<std::string> out;
    std::istringstream in(read_file(dir + "/metrics.jsonl"));
    std::string line;
    while (std::getline(in, line)) out.push_back(line);
    return out;
  };
  auto same = rows(dirs["same"]), host = rows(dirs["host"]);
  ASSERT_EQ(same.size(), 4u);
  ASSERT_EQ(host.size(), 4u);
  for (size_t i = 0; i < same.size(); ++i) {
    auto a = json::parse(same[i], "same"), b = json::parse(host[i], "host");
    const bool generation_step = i % 2 == 0;
    std::vector<const char*> keys = {"loss", "kl", "grad_norm", "entropy"};
    if (generation_step) keys.push_back("reward");
    for (const char* k : keys) {
      ASSERT_TRUE(a.HasMember(k) && b.HasMember(k)) << k << " at step " << i + 1;
      EXPECT_EQ(a[k].GetDouble(), b[k].GetDouble()) << k << " at step " << i + 1;
    }
    if (i > 0) EXPECT_GT(a["kl"].GetDouble(), 0) << "step " << i + 1 << ": the policy has moved from the reference";
    for (const auto* d : {&a, &b}) {
      EXPECT_TRUE(d->HasMember("time/update_s")) << "step " << i + 1;
      EXPECT_EQ(d->HasMember("time/reference_s"), generation_step) << "step " << i + 1;
      EXPECT_EQ(d->HasMember("time/generate_s"), generation_step) << "step " << i + 1;
    }
  }
  auto pa = checkpoint::read_checkpoint_tensors(dirs["same"] + "/final");
  auto pb = checkpoint::read_checkpoint_tensors(dirs["host"] + "/final");
  for (auto& [name, t] : pa) EXPECT_TRUE(torch::equal(t, pb.at(name))) << name;
}

// rollout.device_loop reaches the engine: on (the device loop, here on the CPU) and off (the host
// loop) draw the same rollouts for the same seeds, so the first step's rewards and losses agree.
TEST(GrpoStage, DeviceLoopKeyPicksTheEnginesLoop) {
  at::set_num_threads(1);
  Fixture f;
  std::map<std::string, std::string> dirs;
  for (const char* loop : {"off", "on"}) {
    SCOPED_TRACE(loop);
    auto r = f.recipe(std::string("loop-") + loop,
                      {"train.max_steps=1", "train.eval_every=0", std::string("rollout.device_loop=") + loop});
    GrpoStage stage(*r, r->run.dir, {}, letters());
    train::Trainer(stage, options_for(*r)).run();
    EXPECT_EQ(stage.last_rollout_stats().device_loop, std::string(loop) == "on");
    if (std::string(loop) == "on") EXPECT_EQ(stage.last_rollout_stats().d2h_copies, stage.last_rollout_stats().decode_steps);
    dirs[loop] = r->run.dir;
  }
  auto off = json::parse(read_file(dirs["off"] + "/metrics.jsonl"), "off");
  auto on = json::parse(read_file(dirs["on"] + "/metrics.jsonl"), "on");
  for (const char* k : {"reward", "loss"}) {
    ASSERT_TRUE(off.HasMember(k) && on.HasMember(k)) << k;
    EXPECT_NEAR(off[k].GetDouble(), on[k].GetDouble(), 1e-5) << k;
  }
}

}  // namespace
}  // namespace ptk::rl
