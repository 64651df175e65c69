// `ptk sft` with model.lora (issue #28) on a tiny random model (hidden 32, 2 layers, byte tokenizer):
// - final/ and checkpoints are PEFT adapter folders holding only lora_A/lora_B tensors; the random-init
//   base is written to run.dir/base and named by base_model_name_or_path; B moved, the base did not;
//   model.lora.save_merged writes final-merged/ whose untargeted tensors are the base's bit for bit;
// - a run stopped at step 3 and rerun to step 6 equals an uninterrupted 6-step run bit for bit, with
//   lora dropout and activation checkpointing on (the dropout masks come back with the RNG state);
// - the next stage takes the adapter folder as model.path (merged base, trained whole) or as
//   model.adapter (the adapter goes on training); an adapter of another rank is refused.
// The LoRA arithmetic itself is tests/model/lora_test's; PEFT as the reference is
// tests/reference/lora_reference_test.py.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

#include "core/checkpoint/adapter_config.h"
#include "core/util/fs.h"
#include "tests/support/run_folders.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_model_json.h"

namespace ptk {
namespace {

using Tensors = std::map<std::string, at::Tensor>;

class SftLora : public ::testing::Test {
 protected:
  void SetUp() override {
    auto r = test::run(test::ptk_binary() + " make-data arithmetic --out " + d_.file("data") +
                       " --train 64 --eval 4 --tokenizer bytes");
    ASSERT_EQ(r.exit_code, 0) << r.out;
    d_.write("model.json", test::kTinyByteModelJson);
    d_.write("sft.json", "{\"model\": {\"config\": \"" + d_.file("model.json") + "\", \"lora\": {\"enabled\": true, "
                         "\"rank\": 4, \"alpha\": 8}},\n"
                         " \"tokenizer\": {\"path\": \"" + d_.file("data") + "\"},\n"
                         " \"data\": {\"train\": [\"" + d_.file("data/sft_train.jsonl") + "\"], \"max_seq_len\": 256},\n"
                         " \"train\": {\"max_steps\": 4, \"micro_batch_size\": 4},\n"
                         " \"optim\": {\"lr\": 1e-2, \"weight_decay\": 0.01}}");
  }
  test::RunResult train(const std::string& run, const std::string& extra, bool expect_ok = true) {
    std::string cmd = test::ptk_binary() + " sft --threads 1 --recipe " + d_.file("sft.json") + " run.dir=" +
                      d_.file(run) + " " + extra;
    auto r = test::run(cmd);
    if (expect_ok) EXPECT_EQ(r.exit_code, 0) << cmd << "\n" << r.out;
    return r;
  }
  test::TempDir d_;
};

TEST_F(SftLora, SavesPeftAdapterFoldersAndTrainsOnlyTheAdapters) {
  auto r = train("run", "checkpoint.every=2 model.lora.save_merged=true");
  ASSERT_EQ(r.exit_code, 0);
  const std::string fin = d_.file("run/final");
  ASSERT_TRUE(checkpoint::is_adapter_folder(fin)) << r.out;
  EXPECT_FALSE(path_exists(fin + "/config.json"));
  EXPECT_FALSE(path_exists(fin + "/model.safetensors"));
  EXPECT_TRUE(path_exists(fin + "/tokenizer.json"));
  EXPECT_TRUE(checkpoint::is_adapter_folder(d_.file("run/checkpoints/step-2")));
  auto cfg = checkpoint::read_adapter_config(fin);
  EXPECT_EQ(cfg.r, 4);
  EXPECT_EQ(cfg.lora_alpha, 8);
  EXPECT_EQ(cfg.task_type, "CAUSAL_LM");
  EXPECT_EQ(cfg.target_modules.size(), 7u);  // all-linear
  EXPECT_EQ(cfg.base_model, d_.file("run/base"));
  ASSERT_TRUE(path_exists(d_.file("run/base/model.safetensors")));

  const Tensors adapter = test::final_params(d_.file("run"));
  EXPECT_EQ(adapter.size(), 2u * 7u * 2u);  // 2 layers x 7 linears x (A, B)
  for (const auto& [name, t] : adapter) {
    EXPECT_EQ(name.rfind("base_model.model.model.layers.", 0), 0u) << name;
    if (name.find("lora_B") != std::string::npos) {
      EXPECT_GT(t.abs().max().item<double>(), 1e-4) << name << " did not move";
    }
  }
  // final-merged: the base plus s·BA on the adapted linears; the rest is the base's, bit for bit.
  const Tensors base = test::folder_params(d_.file("run/base")), merged = test::folder_params(d_.file("run/final-merged"));
  ASSERT_EQ(base.size(), merged.size());
  int changed = 0;
  for (const auto& [name, t] : base) {
    const bool linear = name.find("_proj.weight") != std::string::npos;
    const double d = (merged.at(name).to(at::kDouble) - t.to(at::kDouble)).abs().max().item<double>();
    if (linear) {
      changed += d > 0;
    } else {
      EXPECT_EQ(d, 0.0) << name << " is not adapted but changed";
    }
  }
  EXPECT_EQ(changed, 14);
  // The summary names what was trained.
  EXPECT_NE(r.out.find("LoRA"), std::string::npos) << r.out;
}

TEST_F(SftLora, StoppedAndRerunEqualsUninterruptedBitForBit) {
  const std::string recipe = "train.micro_batch_size=2 train.grad_accum=2 optim.schedule=constant optim.warmup_steps=5 "
                             "checkpoint.every=3 model.lora.dropout=0.1 model.activation_checkpointing=true";
  train("full", recipe + " train.max_steps=6");
  train("run", recipe + " train.max_steps=3");
  auto r = train("run", recipe + " train.max_steps=6");
  EXPECT_NE(r.out.find("resumed from " + d_.file("run/checkpoints/step-3") + " at step 3"), std::string::npos) << r.out;
  const Tensors resumed = test::final_params(d_.file("run")), full = test::final_params(d_.file("full"));
  EXPECT_EQ(test::max_param_diff(resumed, full), 0.0) << "the resumed run's adapters differ from the uninterrupted run's";
  EXPECT_GT(test::max_param_diff(full, test::folder_params(d_.file("full/checkpoints/step-3"))), 1e-5)
      << "steps 4-6 hardly moved the adapters";
  // Only the adapters have optimizer state.
  const auto state = test::optimizer_state(d_.file("run/checkpoints/step-3"));
  EXPECT_GE(state.size(), 28u);
  for (const auto& [name, t] : state) EXPECT_NE(name.find("lora_"), std::string::npos) << name;
}

TEST_F(SftLora, NextStageTakesTheAdapterAsModelPathOrAsModelAdapter) {
  train("first", "train.max_steps=2");
  const std::string first = d_.file("first/final");
  // model.path = the adapter folder: its base with the adapter merged, trained whole.
  auto r = train("whole", "model.config= model.path=" + first + " model.lora.enabled=false train.max_steps=1");
  ASSERT_EQ(r.exit_code, 0);
  EXPECT_TRUE(path_exists(d_.file("whole/final/model.safetensors")));
  // model.adapter: the same adapter goes on training; with lr 1e-30 (AdamW moves each weight by ~lr,
  // far below its float32 spacing) it comes out unchanged, so it was loaded.
  r = train("again", "model.adapter=" + first + " train.max_steps=1 optim.lr=1e-30 optim.warmup_steps=0");
  ASSERT_EQ(r.exit_code, 0);
  EXPECT_EQ(test::max_param_diff(test::final_params(d_.file("again")), test::final_params(d_.file("first"))), 0.0);
  EXPECT_EQ(checkpoint::read_adapter_config(d_.file("again/final")).base_model, d_.file("again/base"));
  // An adapter of another rank is refused, naming both.
  r = train("bad", "model.adapter=" + first + " model.lora.rank=8 train.max_steps=1", false);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find("differs from model.lora: rank 4 (recipe 8)"), std::string::npos) << r.out;
  r = train("bad1", "model.adapter=" + first + " model.lora.dropout=0.1 train.max_steps=1", false);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find("differs from model.lora: dropout"), std::string::npos) << r.out;
  // model.adapter without LoRA is refused with the way out.
  r = train("bad2", "model.adapter=" + first + " model.lora.enabled=false train.max_steps=1", false);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find("model.lora.enabled is false"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace ptk
