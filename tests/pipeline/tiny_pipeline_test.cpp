// The README's main job end to end: `ptk pipeline --recipe recipes/tiny/pipeline.json` — the shipped
// spec and its stage recipes, run as shipped (make-data setup, SFT -> DPO from an SFT checkpoint ->
// RM -> GRPO against the reward server serving the RM) with only sizes shortened from the command
// line: a few steps a stage, small evals, and DPO starting from the SFT checkpoint this short run
// keeps (the spec's step-1500 does not exist after 4 steps). Each stage's run folder (metrics per
// step, final/ loadable, report.md), the chaining, the summary table, and a rerun that skips all.
#include <gtest/gtest.h>

#include <filesystem>
#include <set>
#include <sstream>

#include "core/util/fs.h"
#include "core/util/json.h"
#include "tests/support/test_util.h"
#include "tests/support/text.h"

namespace ptk {
namespace {

namespace fs = std::filesystem;

using test::count;

// The steps metrics.jsonl has lines for (each line one step; eval figures join their step's line).
std::vector<int64_t> logged_steps(const std::string& path) {
  std::vector<int64_t> steps;
  std::istringstream in(read_file(path));
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    auto d = json::parse(line, path);
    steps.push_back(d.HasMember("step") ? d["step"].GetInt64() : -1);
  }
  return steps;
}

// Stage order in recipes/tiny/pipeline.json: 0 sft, 1 dpo, 2 rm, 3 grpo. Steps per stage, and the
// evals cut to a few prompts (the stages' held-out greedy evals, GRPO's sampled one, the pipeline's).
const int kSftSteps = 4, kDpoSteps = 3, kRmSteps = 3, kGrpoSteps = 2;
std::string shortened() {
  auto st = [](int i, const std::string& kv) { return " 'stages[" + std::to_string(i) + "]." + kv + "'"; };
  return " eval.limit=8" +
         st(0, "overrides.train.max_steps=" + std::to_string(kSftSteps)) + st(0, "overrides.train.eval_every=4") +
         st(0, "overrides.checkpoint.every=2") + st(0, "overrides.sft.eval_max_prompts=8") +
         st(1, "model_from=sft@step-2") + st(1, "overrides.train.max_steps=" + std::to_string(kDpoSteps)) +
         st(1, "overrides.train.eval_every=3") + st(1, "overrides.dpo.eval_max_prompts=8") +
         st(2, "overrides.train.max_steps=" + std::to_string(kRmSteps)) + st(2, "overrides.train.eval_every=3") +
         // 4 prompts x 8 samples a step (the recipe's micro-batch of 32, one micro-batch).
         st(3, "overrides.train.max_steps=" + std::to_string(kGrpoSteps)) + st(3, "overrides.train.grad_accum=1") +
         st(3, "overrides.train.eval_every=2") + st(3, "overrides.grpo.eval_max_prompts=8") +
         st(3, "overrides.grpo.eval_num_samples=2");
}

TEST(TinyPipeline, RunsEndToEndAndSkipsEveryStageOnRerun) {
  test::TempDir d;
  // Recipes name paths relative to the repository root (recipes/tiny/model.json, data/arith/...):
  // run in a scratch folder that sees recipes/ through a link, so data/ and runs/ land there.
  fs::create_directory_symlink(test::source_dir() + "/recipes", d.file("recipes"));
  const std::string cmd = "cd '" + d.path() + "' && " + test::ptk_binary() +
                          " pipeline --threads 1 --recipe recipes/tiny/pipeline.json" + shortened();
  auto r = test::run(cmd);
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const std::string runs = d.file("runs/pipeline");

  EXPECT_NE(r.out.find("setup: ptk make-data arithmetic --out data/arith --tokenizer bytes"), std::string::npos) << r.out;
  EXPECT_TRUE(path_exists(d.file("data/arith/manifest.json")));
  const std::vector<std::pair<std::string, int>> stages = {
      {"sft", kSftSteps}, {"dpo", kDpoSteps}, {"rm", kRmSteps}, {"grpo", kGrpoSteps}};
  for (auto& [name, steps] : stages) {
    SCOPED_TRACE(name);
    const std::string dir = runs + "/" + name;
    std::vector<int64_t> want(steps);
    for (int i = 0; i < steps; ++i) want[i] = i + 1;
    EXPECT_EQ(logged_steps(dir + "/metrics.jsonl"), want);
    EXPECT_TRUE(path_exists(dir + "/final/model.safetensors"));
    EXPECT_TRUE(path_exists(dir + "/final/config.json"));
    EXPECT_NE(read_file(dir + "/report.md").find("- steps: " + std::to_string(steps) + " of " + std::to_string(steps)),
              std::string::npos);
    EXPECT_NE(r.out.find("| " + name + " | " + name + " | ran |"), std::string::npos) << r.out;
  }

  // Chaining as the spec says: DPO from an SFT checkpoint, RM from SFT's final/, GRPO from DPO's
  // final/, rewarded only by the server (its verifiers and rm/final), started on a loopback port.
  auto model_path = [&](const std::string& stage) {
    auto cfg = json::parse_file(runs + "/" + stage + "/config.json", json::Syntax::kRelaxed);
    return std::string(cfg["model"]["path"].GetString());
  };
  EXPECT_EQ(model_path("sft"), "");  // random init from recipes/tiny/model.json
  EXPECT_EQ(model_path("dpo"), "runs/pipeline/sft/checkpoints/step-2");
  EXPECT_EQ(model_path("rm"), "runs/pipeline/sft/final");
  EXPECT_EQ(model_path("grpo"), "runs/pipeline/dpo/final");
  auto grpo_cfg = json::parse_file(runs + "/grpo/config.json", json::Syntax::kRelaxed);
  EXPECT_EQ(grpo_cfg["grpo"]["reward_funcs"].Size(), 0u);
  ASSERT_EQ(grpo_cfg["grpo"]["reward_urls"].Size(), 1u);
  EXPECT_EQ(std::string(grpo_cfg["grpo"]["reward_urls"][0].GetString()).rfind("http://127.0.0.1:", 0), 0u);
  EXPECT_NE(r.out.find("stage grpo: reward server ready at http://127.0.0.1:"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("stage grpo: reward server stopped"), std::string::npos) << r.out;
  // Every GRPO step was scored by the server alone (the `remote` source), and the server scored as
  // recipes/tiny/reward_server.json says: 0.1 x the RM (rm/final) + 1 x math + 0.2 x format_answer.
  // The means are linear in the per-item rewards, so the identity holds up to the float32 RM scores
  // and JSON round trips (~1e-7 on rewards of ~0.1-1): 1e-5.
  std::istringstream grpo_log(read_file(runs + "/grpo/metrics.jsonl"));
  int scored = 0;
  for (std::string line; std::getline(grpo_log, line);) {
    if (line.empty()) continue;
    auto m = json::parse(line, "grpo/metrics.jsonl");
    ASSERT_TRUE(m.HasMember("rewards/remote/mean") && m.HasMember("rewards/remote/rm/mean") &&
                m.HasMember("rewards/remote/math/mean") && m.HasMember("rewards/remote/format_answer/mean"))
        << line;
    EXPECT_FALSE(m.HasMember("rewards/math/mean")) << "a local verifier scored too: " << line;
    EXPECT_NEAR(m["rewards/remote/mean"].GetDouble(),
                0.1 * m["rewards/remote/rm/mean"].GetDouble() + 1.0 * m["rewards/remote/math/mean"].GetDouble() +
                    0.2 * m["rewards/remote/format_answer/mean"].GetDouble(),
                1e-5)
        << line;
    EXPECT_NE(m["rewards/remote/rm/mean"].GetDouble(), 0.0) << "the server scored without its reward model";
    ++scored;
  }
  EXPECT_EQ(scored, kGrpoSteps);

  // Held-out accuracy after each policy stage (ptk eval loaded each final/), none for the RM.
  for (const char* name : {"sft", "dpo", "grpo"}) {
    EXPECT_NE(r.out.find(std::string("held-out accuracy after ") + name + ": "), std::string::npos) << r.out;
    auto ev = json::parse_file(runs + "/" + name + "/heldout_eval.json");
    EXPECT_TRUE(ev["accuracy"].IsNumber()) << name;
  }
  EXPECT_EQ(r.out.find("held-out accuracy after rm: "), std::string::npos) << r.out;
  // The RM's final/ loads as a reward model (the server loaded it too): ptk eval scores with it.
  auto rm = test::run("cd '" + d.path() + "' && " + test::ptk_binary() +
                      " eval --threads 1 --model runs/pipeline/grpo/final --reward-model runs/pipeline/rm/final"
                      " --data data/arith/rl_eval.jsonl --limit 2 --max-new-tokens 4 --output rm_eval.json");
  ASSERT_EQ(rm.exit_code, 0) << rm.out;
  EXPECT_TRUE(json::parse_file(d.file("rm_eval.json"))["mean_reward"].IsNumber()) << rm.out;

  std::string summary = read_file(runs + "/summary.md");
  EXPECT_NE(summary.find("| stage | command | status | time | held-out accuracy (math) | last metrics | output |"),
            std::string::npos) << summary;
  for (auto& [name, steps] : stages)
    EXPECT_NE(summary.find("| " + name + " | " + name + " | ran |"), std::string::npos) << summary;
  EXPECT_NE(summary.find("runs/pipeline/grpo/final |"), std::string::npos) << summary;

  // The same command again: setup and all four stages skipped, nothing trained or served.
  std::string grpo_metrics = read_file(runs + "/grpo/metrics.jsonl");
  auto again = test::run(cmd);
  ASSERT_EQ(again.exit_code, 0) << again.out;
  EXPECT_NE(again.out.find("setup: data/arith/manifest.json exists, skipping"), std::string::npos) << again.out;
  EXPECT_EQ(count(again.out, "is complete for this recipe; skipping"), 4u) << again.out;
  for (auto& [name, steps] : stages)
    EXPECT_NE(again.out.find("| " + name + " | " + name + " | skipped (done) |"), std::string::npos) << again.out;
  EXPECT_EQ(again.out.find("starting its reward server"), std::string::npos) << again.out;
  EXPECT_EQ(read_file(runs + "/grpo/metrics.jsonl"), grpo_metrics);
}

}  // namespace
}  // namespace ptk
