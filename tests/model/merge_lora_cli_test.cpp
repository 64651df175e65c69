// `ptk merge-lora` end to end on a tiny LoRA SFT run (hidden 32, 2 layers, byte tokenizer, random-init
// base in run/base):
// - the merged folder is a plain HF folder (config.json, model.safetensors, generation_config.json, the
//   tokenizer files; no adapter files) whose tensors equal the stage's own final-merged/ bit for bit,
//   and `ptk forward` gives the same logits for it as for the adapter folder (which differ from the
//   base's: the adapter did something);
// - --dtype bfloat16 writes bf16 weights within bf16 rounding of the float32 merge;
// - refusals name the folder: a plain model folder as --adapter, a missing base, a base of another
//   shape, --output onto an input.
// transformers loading the merged folder (and PEFT's own merge as the reference) is
// tests/reference/merge_lora_reference_test.py; the reward-model adapter is tests/reward/rm_lora_test.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>

#include "core/checkpoint/adapter_config.h"
#include "core/checkpoint/checkpoint.h"
#include "core/checkpoint/hf_config.h"
#include "core/util/fs.h"
#include "tests/support/run_folders.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_model_json.h"

namespace ptk {
namespace {

class MergeLora : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    d_ = new test::TempDir();
    auto r = test::run(test::ptk_binary() + " make-data arithmetic --out " + d_->file("data") +
                       " --train 32 --eval 4 --tokenizer bytes");
    ASSERT_EQ(r.exit_code, 0) << r.out;
    d_->write("model.json", test::kTinyByteModelJson);
    d_->write("sft.json", "{\"model\": {\"config\": \"" + d_->file("model.json") + "\", \"lora\": {\"enabled\": true, "
                          "\"rank\": 4, \"alpha\": 8, \"save_merged\": true}},\n"
                          " \"tokenizer\": {\"path\": \"" + d_->file("data") + "\"},\n"
                          " \"data\": {\"train\": [\"" + d_->file("data/sft_train.jsonl") + "\"], \"max_seq_len\": 256},\n"
                          " \"train\": {\"max_steps\": 3, \"micro_batch_size\": 4},\n"
                          " \"optim\": {\"lr\": 3e-2, \"warmup_steps\": 0}}");
    r = test::run(test::ptk_binary() + " sft --threads 1 --recipe " + d_->file("sft.json") + " run.dir=" + d_->file("run"));
    ASSERT_EQ(r.exit_code, 0) << r.out;
    // One token sequence of the task, right-padded in a second row.
    d_->write("in.json", R"({"input_ids": [[87, 104, 97, 116, 32, 105, 115, 32, 49, 50, 43, 51, 52, 63, 258],
                                          [49, 43, 49, 61, 50, 256, 256, 256, 256, 256, 256, 256, 256, 256, 256]],
                           "attention_mask": [[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1], [1,1,1,1,1,0,0,0,0,0,0,0,0,0,0]]})");
  }
  static void TearDownTestSuite() {
    delete d_;
    d_ = nullptr;
  }
  static test::RunResult merge(const std::string& args) {
    return test::run(test::ptk_binary() + " merge-lora --threads 1 " + args);
  }
  static at::Tensor logits(const std::string& model, const std::string& name) {
    auto r = test::run(test::ptk_binary() + " forward --threads 1 --model " + model + " --input " + d_->file("in.json") +
                       " --output " + d_->file(name + ".safetensors"));
    EXPECT_EQ(r.exit_code, 0) << r.out;
    if (r.exit_code != 0) return {};
    return checkpoint::read_safetensors(d_->file(name + ".safetensors")).at("logits");
  }
  static test::TempDir* d_;
};
test::TempDir* MergeLora::d_ = nullptr;

TEST_F(MergeLora, MergedFolderIsPlainAndGivesTheAdapterFoldersLogits) {
  ASSERT_TRUE(checkpoint::is_adapter_folder(d_->file("run/final")));
  auto r = merge("--adapter " + d_->file("run/final") + " --output " + d_->file("merged"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  for (const char* f : {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"})
    EXPECT_TRUE(path_exists(d_->file(std::string("merged/") + f))) << f << " missing\n" << r.out;
  EXPECT_FALSE(path_exists(d_->file("merged/adapter_config.json")));
  EXPECT_FALSE(checkpoint::is_adapter_folder(d_->file("merged")));
  EXPECT_EQ(checkpoint::read_config(d_->file("merged")).torch_dtype, "float32");  // auto: the base's
  // No staging folder left behind.
  for (const auto& e : std::filesystem::directory_iterator(d_->path()))
    EXPECT_EQ(e.path().filename().string().find("merged."), std::string::npos) << e.path();

  // The same merge as the stage's final-merged/ (model.lora.save_merged), tensor for tensor.
  auto mine = test::folder_params(d_->file("merged")), stage = test::folder_params(d_->file("run/final-merged"));
  EXPECT_EQ(test::max_param_diff(mine, stage), 0.0);

  at::Tensor a = logits(d_->file("run/final"), "adapter"), m = logits(d_->file("merged"), "merged"),
             b = logits(d_->file("run/base"), "base");
  ASSERT_TRUE(a.defined() && m.defined() && b.defined());
  EXPECT_EQ((a - m).abs().max().item<double>(), 0.0) << "merged folder's logits differ from the adapter folder's";
  EXPECT_GT((a - b).abs().max().item<double>(), 1e-4) << "the adapter hardly changed the base's logits";
}

TEST_F(MergeLora, Bfloat16OutputIsTheMergeRounded) {
  auto r = merge("--adapter " + d_->file("run/final") + " --output " + d_->file("merged-bf16") + " --dtype bfloat16");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(checkpoint::read_config(d_->file("merged-bf16")).torch_dtype, "bfloat16");
  auto bf = test::folder_params(d_->file("merged-bf16")), f32 = test::folder_params(d_->file("run/final-merged"));
  ASSERT_EQ(bf.size(), f32.size());
  for (const auto& [name, t] : bf) {
    EXPECT_EQ(t.scalar_type(), at::kBFloat16) << name;
    const at::Tensor want = f32.at(name);
    // Within half a bf16 ulp of each float32 value (plus the base's own rounding to bf16 first).
    const double err = (t.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
    EXPECT_LE(err, want.abs().max().item<double>() * std::pow(2.0, -7)) << name;
  }
}

TEST_F(MergeLora, RefusalsNameTheFolder) {
  // A plain model folder as --adapter.
  auto r = merge("--adapter " + d_->file("run/base") + " --output " + d_->file("x"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find(d_->file("run/base") + " is not a PEFT adapter folder"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("model folder already"), std::string::npos) << r.out;
  // --output onto an input.
  r = merge("--adapter " + d_->file("run/final") + " --output " + d_->file("run/final/"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find("is an input folder"), std::string::npos) << r.out;
  EXPECT_TRUE(checkpoint::is_adapter_folder(d_->file("run/final")));
  // A base that is gone: the adapter's base_model_name_or_path, then --model.
  std::filesystem::create_directories(d_->file("moved"));
  for (const char* f : {"adapter_config.json", "adapter_model.safetensors"})
    std::filesystem::copy_file(d_->file(std::string("run/final/") + f), d_->file(std::string("moved/") + f));
  std::string cfg = read_file(d_->file("moved/adapter_config.json"));
  const std::string base = d_->file("run/base");
  cfg.replace(cfg.find(base), base.size(), d_->file("nowhere"));
  d_->write("moved/adapter_config.json", cfg);
  r = merge("--adapter " + d_->file("moved") + " --output " + d_->file("x"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find(d_->file("nowhere")), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("--model"), std::string::npos) << r.out;
  // ... and given with --model, the copy works.
  r = merge("--adapter " + d_->file("moved") + " --model " + base + " --output " + d_->file("moved-merged"));
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(test::max_param_diff(test::folder_params(d_->file("moved-merged")), test::folder_params(d_->file("run/final-merged"))), 0.0);
  // A base of another shape (intermediate_size 48): the mis-shaped tensor is named.
  std::string other = test::kTinyByteModelJson;
  other.replace(other.find("\"intermediate_size\": 64"), 23, "\"intermediate_size\": 48");
  d_->write("other.json", other);
  r = test::run(test::ptk_binary() + " sft --threads 1 --recipe " + d_->file("sft.json") + " run.dir=" + d_->file("other") +
                " model.config=" + d_->file("other.json") + " model.lora.enabled=false model.lora.save_merged=false "
                "train.max_steps=1");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  r = merge("--adapter " + d_->file("run/final") + " --model " + d_->file("other/final") + " --output " + d_->file("x"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find("does not fit the base " + d_->file("other/final")), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("mlp"), std::string::npos) << r.out;
  EXPECT_FALSE(path_exists(d_->file("x")));
}

}  // namespace
}  // namespace ptk
