// `ptk plan`: a recipe's memory plan printed without training (apps/ptk/cmd_plan.cpp over
// core/train/memory_estimate.h): the Qwen2.5-7B shape (bench/shapes) on an 80 GiB GPU, full
// fine-tuning refused with the refusal's hint, LoRA r16 on all linears fitting with PEFT's parameter
// count; the stage's own terms (DPO's reference); usage errors. Reads config.json only.
#include <gtest/gtest.h>

#include <string>

#include "tests/support/test_util.h"

namespace ptk {
namespace {

std::string recipe(const test::TempDir& d, const std::string& extra_model = "") {
  return d.write("plan.json", "{\"model\": {\"config\": \"" + test::source_dir() +
                                  "/bench/shapes/qwen2.5-7b.json\", \"activation_checkpointing\": true" +
                                  extra_model + "},\n \"data\": {\"train\": [\"unused.jsonl\"], \"max_seq_len\": 4096},\n"
                                  " \"train\": {\"micro_batch_size\": 1}}\n");
}

TEST(PlanCli, SevenBFullDoesNotFitEightyGibLoraDoes) {
  test::TempDir d;
  const std::string r = recipe(d);
  auto full = test::run(test::ptk_binary() + " plan --recipe " + r + " --gpu-memory 80");
  EXPECT_EQ(full.exit_code, 1) << full.out;
  for (const char* want : {"ptk plan: sft, model.config=", "(hidden 3584, 28 layers, 28 heads / 4 kv heads",
                           "7.62B parameters, bfloat16 on a CUDA device; trained: every parameter",
                           "AdamW moments + fp32 master weights", "peak phase: training step",
                           "does not fit: 80.00 GiB available (--gpu-memory 80)",
                           "no batch or length key makes this fit", "model.lora.enabled=true"})
    EXPECT_NE(full.out.find(want), std::string::npos) << want << "\n" << full.out;
  auto lora = test::run(test::ptk_binary() + " plan --recipe " + r + " --gpu-memory 80 model.lora.enabled=true");
  EXPECT_EQ(lora.exit_code, 0) << lora.out;
  for (const char* want : {"trained: LoRA adapters, 40370176 parameters (model.lora.rank=16)", "frozen base weights",
                           "LoRA AdamW moments + fp32 master weights", "fits: 80.00 GiB available", "to spare"})
    EXPECT_NE(lora.out.find(want), std::string::npos) << want << "\n" << lora.out;
  EXPECT_EQ(lora.out.find("frozen reference"), std::string::npos) << lora.out;
}

// 72B: even LoRA's frozen bf16 base (135 GiB) exceeds one 80 GiB GPU; the hint says what does not help.
TEST(PlanCli, SeventyTwoBLoraSaysTheBaseIsTooLarge) {
  test::TempDir d;
  const std::string r = d.write("p.json", "{\"model\": {\"config\": \"" + test::source_dir() +
                                               "/bench/shapes/qwen2.5-72b.json\"}, \"data\": {\"max_seq_len\": 4096}}\n");
  auto out = test::run(test::ptk_binary() + " plan --recipe " + r + " --gpu-memory 80 model.lora.enabled=true");
  EXPECT_EQ(out.exit_code, 1) << out.out;
  for (const char* want : {"72.71B parameters", "needs ~135.43 GiB for frozen base weights",
                           "with LoRA the frozen base (135.43 GiB) is whole on every rank", "no QLoRA"})
    EXPECT_NE(out.out.find(want), std::string::npos) << want << "\n" << out.out;
}

TEST(PlanCli, DpoUnderLoraHasNoReferenceCopy) {
  test::TempDir d;
  auto r = test::run(test::ptk_binary() + " plan --stage dpo --recipe " + recipe(d) +
                     " --gpu-memory 80 model.lora.enabled=true dpo.precompute_ref_log_probs=false");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("ptk plan: dpo,"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("reference = the base with the adapters off"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("frozen reference model"), std::string::npos) << r.out;
  auto full = test::run(test::ptk_binary() + " plan --stage dpo --recipe " + recipe(d) +
                        " --gpu-memory 1000 dpo.precompute_ref_log_probs=false");
  EXPECT_EQ(full.exit_code, 0) << full.out;
  EXPECT_NE(full.out.find("frozen reference model"), std::string::npos) << full.out;
}

TEST(PlanCli, UsageErrors) {
  test::TempDir d;
  auto bad = test::run(test::ptk_binary() + " plan --stage ppo --recipe " + recipe(d));
  EXPECT_EQ(bad.exit_code, 2) << bad.out;
  EXPECT_NE(bad.out.find("--stage must be sft, dpo, rm or grpo, not ppo"), std::string::npos) << bad.out;
  const std::string none = d.write("none.json", "{\"data\": {\"train\": [\"x.jsonl\"]}}\n");
  auto r = test::run(test::ptk_binary() + " plan --recipe " + none);
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("no config.json to plan from"), std::string::npos) << r.out;
  auto gpu = test::run(test::ptk_binary() + " plan --recipe " + recipe(d) + " --gpu-memory 0");
  EXPECT_EQ(gpu.exit_code, 2) << gpu.out;
}

}  // namespace
}  // namespace ptk
