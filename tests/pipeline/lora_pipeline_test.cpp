// LoRA in every stage of a pipeline by one override (issue #28): the pipeline recipe's top-level
// "overrides" (here given on the command line, overrides.model.lora.enabled=true) reach every stage.
// - recipes/tiny/pipeline.json with it passes --dry-run (every stage's recipe takes model.lora.*), and
//   a misspelt top-level key is refused by each of the four stages (so each got it);
// - SFT -> DPO (from a kept SFT checkpoint, itself an adapter folder) -> RM -> GRPO (from DPO) on the
//   tiny stage recipes (a few steps each) with LoRA: every final/ is a PEFT adapter folder whose chain
//   of bases resolves (dpo's: onto sft/checkpoints/step-2, onto sft/base, the random-init base), the
//   RM's a SEQ_CLS adapter; the later stages take them as model.path; GRPO's reward server serves
//   rm/final (an adapter folder) and scored every step with it; a rerun skips every stage (adapter
//   folders count as complete).
#include <gtest/gtest.h>

#include <filesystem>
#include <set>
#include <sstream>

#include "core/checkpoint/adapter_config.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "tests/support/test_util.h"
#include "tests/support/text.h"

namespace ptk {
namespace {

namespace fs = std::filesystem;

// The stages whose final/ must be an adapter folder with model.lora.enabled.
const std::set<std::string> kLoraStages = {"sft", "dpo", "rm", "grpo"};
const int kGrpoSteps = 2;

const char* kPipeline = R"({
  "setup": [{"ptk": ["make-data", "arithmetic", "--out", "data/arith", "--tokenizer", "bytes", "--train", "200"],
             "creates": "data/arith/manifest.json"}],
  "eval": {"data": "data/arith/rl_eval.jsonl", "verifier": "math", "max_new_tokens": 24, "limit": 4},
  "stages": [
    {"name": "sft", "command": "sft", "recipe": "recipes/tiny/sft.json",
     "overrides": {"train.max_steps": 3, "train.eval_every": 3, "sft.eval_max_prompts": 4, "checkpoint.every": 2}},
    {"name": "dpo", "command": "dpo", "recipe": "recipes/tiny/dpo.json", "model_from": "sft@step-2",
     "overrides": {"train.max_steps": 2, "train.eval_every": 2, "dpo.eval_max_prompts": 4}},
    {"name": "rm", "command": "rm", "recipe": "recipes/tiny/rm.json", "model_from": "sft",
     "overrides": {"train.max_steps": 2, "train.eval_every": 2}},
    {"name": "grpo", "command": "grpo", "recipe": "recipes/tiny/grpo.json", "model_from": "dpo",
     "overrides": {"grpo.reward_funcs": [], "grpo.reward_weights": [], "grpo.scale_rewards": "none",
                   "train.max_steps": 2, "train.grad_accum": 1, "train.eval_every": 2, "grpo.eval_max_prompts": 4,
                   "grpo.eval_num_samples": 2},
     "reward_server": {"recipe": "recipes/tiny/reward_server.json", "threads": 1, "url_key": "grpo.reward_urls"}}
  ]
})";

class LoraPipeline : public ::testing::Test {
 protected:
  void SetUp() override {
    // Recipes name paths relative to the repository root: run in a scratch folder that sees recipes/
    // through a link, so data/ and runs/ land there.
    fs::create_directory_symlink(test::source_dir() + "/recipes", d_.file("recipes"));
  }
  std::string ptk_in_dir(const std::string& args) const {
    return "cd '" + d_.path() + "' && " + test::ptk_binary() + " " + args;
  }
  test::TempDir d_;
};

TEST_F(LoraPipeline, ShippedTinyPipelineTakesTheOverrideInEveryStage) {
  auto r = test::run(ptk_in_dir("pipeline --dry-run --threads 1 --recipe recipes/tiny/pipeline.json "
                                "overrides.model.lora.enabled=true"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  for (const char* stage : {"sft", "dpo", "rm", "grpo"})
    EXPECT_NE(r.out.find(std::string("ptk ") + stage), std::string::npos) << r.out;
  // A misspelt key reaches every stage too, and each stage's --check refuses it.
  r = test::run(ptk_in_dir("pipeline --dry-run --threads 1 --recipe recipes/tiny/pipeline.json "
                           "overrides.model.lora.rankk=4"));
  EXPECT_NE(r.exit_code, 0) << r.out;
  for (const char* stage : {"sft", "dpo", "rm", "grpo"})
    EXPECT_NE(r.out.find(std::string("[") + stage + "]   - command line: unknown key model.lora.rankk (did you mean "
                         "model.lora.rank?)"),
              std::string::npos)
        << r.out;
  r = test::run(ptk_in_dir("pipeline --dry-run --threads 1 --recipe recipes/tiny/pipeline.json overrides.run.dir=x"));
  EXPECT_NE(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("run.dir is set by the pipeline"), std::string::npos) << r.out;
}

TEST_F(LoraPipeline, EveryStageWritesAnAdapterFolderAndTheServerServesTheAdapterRm) {
  d_.write("lora_pipeline.json", kPipeline);
  const std::string cmd = ptk_in_dir("pipeline --threads 1 --recipe lora_pipeline.json overrides.model.lora.enabled=true "
                                     "overrides.model.lora.rank=4");
  auto r = test::run(cmd);
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const std::string runs = d_.file("runs/lora_pipeline");
  for (const char* name : {"sft", "dpo", "rm", "grpo"}) {
    SCOPED_TRACE(name);
    const std::string dir = runs + "/" + name, fin = dir + "/final";
    EXPECT_NE(r.out.find("| " + std::string(name) + " | " + name + " | ran |"), std::string::npos) << r.out;
    // The override reached the stage's recipe.
    auto cfg = json::parse_file(dir + "/config.json", json::Syntax::kRelaxed);
    EXPECT_TRUE(cfg["model"]["lora"]["enabled"].GetBool());
    EXPECT_EQ(cfg["model"]["lora"]["rank"].GetInt64(), 4);
    if (kLoraStages.count(name)) {
      ASSERT_TRUE(checkpoint::is_adapter_folder(fin)) << fin;
      EXPECT_TRUE(path_exists(fin + "/adapter_model.safetensors"));
      EXPECT_EQ(checkpoint::read_adapter_config(fin).r, 4);
    }
    const std::string root = checkpoint::model_root_dir(fin);  // the chain of bases ends in a model folder
    EXPECT_TRUE(path_exists(root + "/config.json")) << root;
    EXPECT_FALSE(checkpoint::is_adapter_folder(root)) << root;
  }
  // DPO from a kept SFT checkpoint (an adapter folder), GRPO from DPO's final/.
  EXPECT_EQ(checkpoint::read_adapter_config(runs + "/dpo/final").base_model, runs + "/sft/checkpoints/step-2");
  EXPECT_EQ(checkpoint::read_adapter_config(runs + "/grpo/final").base_model, runs + "/dpo/final");
  EXPECT_EQ(checkpoint::model_root_dir(runs + "/grpo/final"), runs + "/sft/base");
  // sft: random init (recipes/tiny/model.json), so its base is written to sft/base.
  EXPECT_EQ(checkpoint::read_adapter_config(runs + "/sft/final").base_model, runs + "/sft/base");
  // The RM: a SEQ_CLS adapter (with its score head) onto sft/final, itself an adapter folder.
  const auto rm_cfg = checkpoint::read_adapter_config(runs + "/rm/final");
  EXPECT_EQ(rm_cfg.task_type, "SEQ_CLS");
  EXPECT_EQ(rm_cfg.base_model, runs + "/sft/final");
  EXPECT_EQ(checkpoint::model_root_dir(runs + "/rm/final"), runs + "/sft/base");
  // The server loaded rm/final and scored every GRPO step with its reward model.
  EXPECT_NE(r.out.find("stage grpo: reward server ready at http://127.0.0.1:"), std::string::npos) << r.out;
  std::istringstream grpo_log(read_file(runs + "/grpo/metrics.jsonl"));
  int scored = 0;
  for (std::string line; std::getline(grpo_log, line);) {
    if (line.empty()) continue;
    auto m = json::parse(line, "grpo/metrics.jsonl");
    ASSERT_TRUE(m.HasMember("rewards/remote/rm/mean")) << line;
    EXPECT_NE(m["rewards/remote/rm/mean"].GetDouble(), 0.0) << "the server scored without its reward model";
    ++scored;
  }
  EXPECT_EQ(scored, kGrpoSteps);
  for (const char* name : {"sft", "dpo", "grpo"})
    EXPECT_NE(r.out.find(std::string("held-out accuracy after ") + name + ": "), std::string::npos) << r.out;
  // Rerun: every stage is complete and skipped.
  auto again = test::run(cmd);
  ASSERT_EQ(again.exit_code, 0) << again.out;
  EXPECT_EQ(test::count(again.out, "is complete for this recipe; skipping"), 4u) << again.out;
  EXPECT_EQ(again.out.find("starting its reward server"), std::string::npos) << again.out;
}

}  // namespace
}  // namespace ptk
