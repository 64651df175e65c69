// `ptk grpo` end to end on a tiny random model, the byte tokenizer and a few arithmetic prompts
// with the math verifier: the run folder docs/DESIGN.md promises, a resumed rerun, clear recipe errors.
// Not the stage's numbers (grpo_stage_test.cpp).
#include <gtest/gtest.h>

#include "core/util/fs.h"
#include "core/util/json.h"
#include "datasets/byte_tokenizer.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_model_json.h"

namespace ptk {
namespace {

std::string write_fixture(const test::TempDir& d) {
  tasks::write_byte_tokenizer(d.file("tok"));
  d.write("model.json", test::kTinyByteModelJson);
  std::string prompts;
  for (int i = 0; i < 8; ++i)
    prompts += "{\"prompt\": [{\"role\": \"user\", \"content\": \"What is " + std::to_string(i) + " + 3?\"}], "
               "\"answer\": \"" + std::to_string(i + 3) + "\"}\n";
  d.write("prompts.jsonl", prompts);
  return d.write("grpo.json", "// a tiny GRPO run\n{\n"
      "\"run\": {\"seed\": 3, \"dir\": \"" + d.file("run") + "\"},\n"
      "\"model\": {\"config\": \"" + d.file("model.json") + "\"},\n"
      "\"tokenizer\": {\"path\": \"" + d.file("tok") + "\"},\n"
      "\"data\": {\"train\": [\"" + d.file("prompts.jsonl") + "\"], \"eval\": [\"" + d.file("prompts.jsonl") + "\"], "
      "\"max_seq_len\": 128},\n"
      "\"train\": {\"max_steps\": 2, \"micro_batch_size\": 4, \"grad_accum\": 1, \"eval_every\": 2},\n"
      "\"checkpoint\": {\"every\": 1},\n"
      "\"grpo\": {\"num_generations\": 4, \"max_completion_length\": 8, \"reward_funcs\": [\"math\", \"format_answer\"],\n"
      "           \"reward_weights\": [1.0, 0.5], \"beta\": 0.04}\n}\n");
}

TEST(GrpoCli, RunsAndWritesTheRunFolder) {
  test::TempDir d;
  std::string recipe = write_fixture(d);
  auto r = test::run(test::ptk_binary() + " grpo --recipe " + recipe + " --threads 1");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("before training, held-out accuracy"), std::string::npos) << r.out;
  for (const char* f : {"config.json", "metrics.jsonl", "final/config.json", "final/model.safetensors",
                        "final/tokenizer.json", "rollouts/step-1.jsonl", "rollouts/step-2.jsonl",
                        "checkpoints/step-2/trainer_state/state.json", "eval_start.json"})
    EXPECT_TRUE(path_exists(d.file("run/") + f)) << f;
  std::string m = read_file(d.file("run/metrics.jsonl"));
  for (const char* k : {"\"rewards/math/mean\"", "\"rewards/format_answer/mean\"", "\"kl\"", "\"eval/accuracy\""})
    EXPECT_NE(m.find(k), std::string::npos) << k << "\n" << m;
  auto line = json::parse(read_file(d.file("run/rollouts/step-1.jsonl")).substr(0, read_file(d.file("run/rollouts/step-1.jsonl")).find('\n')), "rollout");
  EXPECT_TRUE(line["rewards"].HasMember("math"));
  EXPECT_TRUE(line["rewards"].HasMember("format_answer"));
  // Rerunning with more steps resumes from step 2.
  auto again = test::run(test::ptk_binary() + " grpo --recipe " + recipe + " --threads 1 train.max_steps=3");
  ASSERT_EQ(again.exit_code, 0) << again.out;
  EXPECT_NE(again.out.find("resumed from"), std::string::npos) << again.out;
  EXPECT_TRUE(path_exists(d.file("run/rollouts/step-3.jsonl")));
}

TEST(GrpoCli, RecipeErrorsNameTheKey) {
  test::TempDir d;
  std::string recipe = write_fixture(d);
  auto r = test::run(test::ptk_binary() + " grpo --recipe " + recipe + " grpo.loss_type=ppo");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find("grpo.loss_type"), std::string::npos) << r.out;
  auto t = test::run(test::ptk_binary() + " grpo --recipe " + recipe + " grpo.temperature=0");
  EXPECT_NE(t.exit_code, 0);
  EXPECT_NE(t.out.find("grpo.temperature"), std::string::npos) << t.out;
  // Cross-section checks come with the sections' own errors and unknown keys, all at once.
  auto c = test::run(test::ptk_binary() + " grpo --recipe " + recipe +
                     " grpo.temperature=0 train.micro_batch_size=3 grpo.tempreature=1");
  EXPECT_NE(c.exit_code, 0);
  for (const char* want : {"grpo.temperature = ", "is not a multiple of grpo.num_generations = 4",
                           "unknown key grpo.tempreature (did you mean grpo.temperature?)", "3 errors in recipe"})
    EXPECT_NE(c.out.find(want), std::string::npos) << want << "\n" << c.out;
  // issue 24: a KV cache no machine holds is refused before the model or engine exist.
  auto k = test::run(test::ptk_binary() + " grpo --recipe " + recipe + " rollout.slots=1000000000000");
  EXPECT_NE(k.exit_code, 0);
  EXPECT_NE(k.out.find("grpo: rollout.slots=1000000000000 x (data.max_seq_len=128 + grpo.max_completion_length=8) "
                       "needs ~"),
            std::string::npos)
      << k.out;
  EXPECT_NE(k.out.find("lower rollout.slots to "), std::string::npos) << k.out;
  EXPECT_FALSE(path_exists(d.file("run/data"))) << "data was prepared before the refusal";
  auto h = test::run(test::ptk_binary() + " grpo --help");
  EXPECT_EQ(h.exit_code, 0);
  for (const char* k : {"num_generations", "epsilon_high", "mask_truncated_completions", "scale_rewards"})
    EXPECT_NE(h.out.find(k), std::string::npos) << k;
}

}  // namespace
}  // namespace ptk
