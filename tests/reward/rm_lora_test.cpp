// `ptk rm` with model.lora (issue #28) on a tiny model (hidden 32, 2 layers, byte tokenizer) whose
// SFT folder (a causal LM, one step from a random init) is model.path:
// - final/ is a PEFT SEQ_CLS adapter folder onto that SFT folder: lora_A/lora_B of every linear plus the
//   score head as modules_to_save (base_model.model.score.weight); B and the head moved, nothing of
//   the base is in it, and only those tensors have optimizer state;
// - loading final/ gives the trained reward model: `ptk forward` scores equal those of final-merged/
//   (written from the trained model in memory) and of `ptk merge-lora`'s folder, bit for bit;
// - `ptk eval --reward-model final/` scores with it (mean reward that of final-merged/).
// The reward server serving an adapter RM: tests/pipeline/tiny_pipeline_test (LoRA pipeline).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

#include "core/checkpoint/adapter_config.h"
#include "core/checkpoint/checkpoint.h"
#include "core/checkpoint/hf_config.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "tests/support/run_folders.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_model_json.h"

namespace ptk {
namespace {

class RmLora : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    d_ = new test::TempDir();
    auto r = test::run(test::ptk_binary() + " make-data arithmetic --out " + d_->file("data") +
                       " --train 64 --eval 8 --tokenizer bytes");
    ASSERT_EQ(r.exit_code, 0) << r.out;
    d_->write("model.json", test::kTinyByteModelJson);
    d_->write("sft.json", "{\"model\": {\"config\": \"" + d_->file("model.json") + "\"},\n"
                          " \"tokenizer\": {\"path\": \"" + d_->file("data") + "\"},\n"
                          " \"data\": {\"train\": [\"" + d_->file("data/sft_train.jsonl") + "\"], \"max_seq_len\": 256},\n"
                          " \"train\": {\"max_steps\": 1, \"micro_batch_size\": 4}}");
    r = test::run(test::ptk_binary() + " sft --threads 1 --recipe " + d_->file("sft.json") + " run.dir=" + d_->file("sft"));
    ASSERT_EQ(r.exit_code, 0) << r.out;
    d_->write("rm.json", "{\"model\": {\"path\": \"" + d_->file("sft/final") + "\", \"lora\": {\"enabled\": true, "
                         "\"rank\": 4, \"alpha\": 8, \"save_merged\": true}},\n"
                         " \"tokenizer\": {\"path\": \"" + d_->file("data") + "\"},\n"
                         " \"data\": {\"train\": [\"" + d_->file("data/preference_train.jsonl") + "\"], "
                         "\"eval\": [\"" + d_->file("data/preference_eval.jsonl") + "\"], \"max_seq_len\": 128},\n"
                         " \"train\": {\"max_steps\": 4, \"micro_batch_size\": 4, \"eval_every\": 4},\n"
                         " \"checkpoint\": {\"every\": 2},\n"
                         " \"optim\": {\"lr\": 2e-2, \"warmup_steps\": 0}}");
    rm_out_ = new std::string;
    r = test::run(test::ptk_binary() + " rm --threads 1 --recipe " + d_->file("rm.json") + " run.dir=" + d_->file("rm"));
    *rm_out_ = r.out;
    ASSERT_EQ(r.exit_code, 0) << r.out;
    d_->write("in.json", R"({"input_ids": [[87, 104, 97, 116, 32, 105, 115, 32, 49, 50, 43, 51, 52, 63, 258],
                                          [49, 43, 49, 61, 50, 258, 256, 256, 256, 256, 256, 256, 256, 256, 256]],
                           "attention_mask": [[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1], [1,1,1,1,1,1,0,0,0,0,0,0,0,0,0]]})");
  }
  static void TearDownTestSuite() {
    delete d_;
    delete rm_out_;
  }
  static at::Tensor scores(const std::string& model, const std::string& name) {
    auto r = test::run(test::ptk_binary() + " forward --threads 1 --model " + model + " --input " + d_->file("in.json") +
                       " --output " + d_->file(name + ".safetensors"));
    EXPECT_EQ(r.exit_code, 0) << r.out;
    if (r.exit_code != 0) return {};
    auto t = checkpoint::read_safetensors(d_->file(name + ".safetensors"));
    EXPECT_TRUE(t.count("scores")) << model << " has no score head";
    return t.count("scores") ? t.at("scores") : at::Tensor();
  }
  static test::TempDir* d_;
  static std::string* rm_out_;
};
test::TempDir* RmLora::d_ = nullptr;
std::string* RmLora::rm_out_ = nullptr;

TEST_F(RmLora, FinalIsASeqClsAdapterWithTheScoreHead) {
  const std::string fin = d_->file("rm/final");
  ASSERT_TRUE(checkpoint::is_adapter_folder(fin)) << *rm_out_;
  EXPECT_FALSE(path_exists(fin + "/config.json"));
  EXPECT_TRUE(checkpoint::is_adapter_folder(d_->file("rm/checkpoints/step-2")));
  const auto cfg = checkpoint::read_adapter_config(fin);
  EXPECT_EQ(cfg.task_type, "SEQ_CLS");
  EXPECT_EQ(cfg.r, 4);
  EXPECT_EQ(cfg.base_model, d_->file("sft/final"));
  EXPECT_EQ(cfg.modules_to_save, std::vector<std::string>{"score"});
  EXPECT_NE(rm_out_->find("LoRA: rank 4"), std::string::npos) << *rm_out_;

  const auto adapter = test::final_params(d_->file("rm"));
  EXPECT_EQ(adapter.size(), 2u * 7u * 2u + 1u);  // 2 layers x 7 linears x (A, B) + the score head
  ASSERT_TRUE(adapter.count("base_model.model.score.weight"));
  EXPECT_EQ(adapter.at("base_model.model.score.weight").sizes(), (std::vector<int64_t>{1, 32}));
  for (const auto& [name, t] : adapter)
    if (name.find("lora_B") != std::string::npos) EXPECT_GT(t.abs().max().item<double>(), 1e-5) << name << " did not move";
  // The score head trained: the checkpoint at step 2 and final/ (step 4) differ in it.
  const auto step2 = test::folder_params(d_->file("rm/checkpoints/step-2"));
  EXPECT_GT((step2.at("base_model.model.score.weight") - adapter.at("base_model.model.score.weight")).abs().max().item<double>(),
            1e-6);
  // Optimizer state for the adapters and the head only.
  for (const auto& [name, t] : test::optimizer_state(d_->file("rm/checkpoints/step-2")))
    EXPECT_TRUE(name.find("lora_") != std::string::npos || name.find(".base_model.model.score.weight") != std::string::npos)
        << name;
}

TEST_F(RmLora, AdapterFolderLoadsAsTheTrainedRewardModel) {
  at::Tensor a = scores(d_->file("rm/final"), "adapter"), m = scores(d_->file("rm/final-merged"), "stage-merged");
  ASSERT_TRUE(a.defined() && m.defined());
  // The same merge (Lora::merge_into) either way; the scores may still differ in the last bit, since
  // the merged folder's weights are read from mmap'ed files and MKL's kernels on AVX-512 round by
  // the data's alignment (5.96e-08 measured). The tolerance still tells models apart: two steps less
  // training (the step-2 checkpoint) moves the scores far more.
  const double ulps = 1e-6;
  EXPECT_LE((a - m).abs().max().item<double>(), ulps) << a << m;
  at::Tensor s2 = scores(d_->file("rm/checkpoints/step-2"), "step2");
  ASSERT_TRUE(s2.defined());
  EXPECT_GT((a - s2).abs().max().item<double>(), 100 * ulps) << a << s2;
  EXPECT_EQ(checkpoint::read_config(d_->file("rm/final-merged")).architecture, "Qwen2ForSequenceClassification");
  auto r = test::run(test::ptk_binary() + " merge-lora --threads 1 --adapter " + d_->file("rm/final") + " --output " +
                     d_->file("merged"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(checkpoint::read_config(d_->file("merged")).architecture, "Qwen2ForSequenceClassification");
  at::Tensor g = scores(d_->file("merged"), "merged");
  ASSERT_TRUE(g.defined());
  EXPECT_LE((a - g).abs().max().item<double>(), ulps) << a << g;

  // ptk eval scores samples with the adapter RM as with its merged folder.
  auto eval = [&](const std::string& rm, const std::string& out) {
    auto e = test::run(test::ptk_binary() + " eval --threads 1 --model " + d_->file("sft/final") + " --reward-model " + rm +
                       " --data " + d_->file("data/rl_eval.jsonl") + " --limit 3 --max-new-tokens 6 --output " +
                       d_->file(out));
    EXPECT_EQ(e.exit_code, 0) << e.out;
    auto doc = json::parse_file(d_->file(out));
    return doc.HasMember("mean_reward") ? doc["mean_reward"].GetDouble() : std::nan("");
  };
  const double ra = eval(d_->file("rm/final"), "ea.json"), rm = eval(d_->file("rm/final-merged"), "em.json");
  EXPECT_TRUE(std::isfinite(ra));
  EXPECT_NEAR(ra, rm, ulps);
}

}  // namespace
}  // namespace ptk
