// Every training stage on a GPU against the same stage on the CPU, through the `ptk` commands and the
// recipe key `run.device`, on a tiny random Qwen2 over make-data's byte tokenizer:
//  - SFT, 50 steps: `run.device=cuda` (model.dtype=auto: bf16 parameters, fp32 master weights and
//    moments) tracks `run.device=cpu` (fp32) within bf16 tolerance at every step, on the same rows
//    (num_tokens equal step by step), and is not the CPU's run bit for bit (that would mean the key
//    was ignored);
//  - DPO and RM, 2 steps from the same fp32 start folder: loss, log-probs / margins and grad norm
//    within bf16 tolerance of the CPU's;
//  - GRPO, 1 step: rollouts of the same prompts in the same order, finite metrics, KL ~0 at the first
//    step (policy = reference). Sampled completions differ between devices (other random streams
//    and bf16 probabilities), so nothing that depends on them is compared.
// Each test skips with a message where no GPU is usable (fails instead under PTK_REQUIRE=gpu, as
// scripts/gpu_check.sh sets it on a GPU machine). Tolerances: bf16 keeps 8 bits of mantissa. The same
// comparison on a CPU (model.dtype=bfloat16 vs float32, 2026-12-07) differed by at most 2e-3 in the
// SFT loss over the 50 steps, 1e-2 in DPO's summed log-probs (~-105), 2e-3 in RM's loss and 11% in
// RM's grad norm (~0.03 after one step); the bounds below leave GPU kernels 5-20 times that.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "core/util/fs.h"
#include "core/util/json.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_model_json.h"

namespace ptk {
namespace {

bool gpu() { return torch::cuda::is_available(); }
#define PTK_NEED_GPU() \
  if (!gpu()) PTK_SKIP_WITHOUT("gpu") << "no usable CUDA GPU on this machine (ptk info says why); runs on a GPU machine"

using Metrics = std::vector<rapidjson::Document>;

Metrics read_metrics(const std::string& run_dir) {
  std::istringstream in(read_file(run_dir + "/metrics.jsonl"));
  Metrics out;
  for (std::string l; std::getline(in, l);)
    if (!l.empty()) out.push_back(json::parse(l, run_dir + "/metrics.jsonl"));
  return out;
}

double num(const rapidjson::Document& m, const char* key) {
  if (!m.HasMember(key) || !m[key].IsNumber()) return std::nan("");
  return m[key].GetDouble();
}

// |gpu - cpu| <= atol + rtol * |cpu|, with both values in the message.
::testing::AssertionResult within_tol(const std::string& what, double gpu_v, double cpu_v, double rtol, double atol) {
  if (std::isfinite(gpu_v) && std::isfinite(cpu_v) && std::abs(gpu_v - cpu_v) <= atol + rtol * std::abs(cpu_v))
    return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": cuda " << gpu_v << " vs cpu " << cpu_v << " (|diff| "
                                       << std::abs(gpu_v - cpu_v) << " > " << atol << " + " << rtol << " * |cpu|)";
}

class CudaStages : public ::testing::Test {
 protected:
  // One folder for the suite: data, the model config and an fp32 start folder (4 SFT steps on the
  // CPU) that DPO and RM begin from on both devices. Made only where a GPU is usable.
  static void SetUpTestSuite() {
    if (!gpu()) return;
    d_ = new test::TempDir();
    auto r = test::run(test::ptk_binary() + " make-data arithmetic --out " + d_->file("data") +
                       " --train 64 --eval 8 --tokenizer bytes");
    ASSERT_EQ(r.exit_code, 0) << r.out;
    d_->write("model.json", test::kTinyByteModelJson);
    d_->write("sft.json", "{\"model\": {\"config\": \"" + d_->file("model.json") + "\"},\n"
                          " \"tokenizer\": {\"path\": \"" + d_->file("data") + "\"},\n"
                          " \"data\": {\"train\": [\"" + d_->file("data/sft_train.jsonl") + "\"], \"max_seq_len\": 128},\n"
                          " \"train\": {\"max_steps\": 50, \"micro_batch_size\": 2},\n"
                          " \"optim\": {\"lr\": 1e-3, \"warmup_steps\": 5},\n"
                          " \"checkpoint\": {\"every\": 0}}");
    r = test::run(stage("sft", "sft.json", "start", "cpu", "train.max_steps=4"));
    ASSERT_EQ(r.exit_code, 0) << r.out;
    const std::string pair_tail = "\"max_seq_len\": 128},\n \"train\": {\"max_steps\": 2, \"micro_batch_size\": 2},\n"
                                  " \"optim\": {\"lr\": 1e-3, \"warmup_steps\": 0},\n \"checkpoint\": {\"every\": 0}";
    d_->write("dpo.json", "{\"model\": {\"path\": \"" + d_->file("start/final") + "\"},\n"
                          " \"data\": {\"train\": [\"" + d_->file("data/preference_train.jsonl") + "\"], " + pair_tail +
                          ",\n \"dpo\": {\"beta\": 0.1}}");
    d_->write("rm.json", "{\"model\": {\"path\": \"" + d_->file("start/final") + "\"},\n"
                         " \"data\": {\"train\": [\"" + d_->file("data/preference_train.jsonl") + "\"], " + pair_tail + "}");
    d_->write("grpo.json", "{\"run\": {\"seed\": 3},\n"
                           " \"model\": {\"path\": \"" + d_->file("start/final") + "\"},\n"
                           " \"data\": {\"train\": [\"" + d_->file("data/rl_train.jsonl") + "\"], \"max_seq_len\": 128},\n"
                           " \"train\": {\"max_steps\": 1, \"micro_batch_size\": 8},\n"
                           " \"checkpoint\": {\"every\": 0},\n"
                           " \"grpo\": {\"num_generations\": 4, \"max_completion_length\": 8,"
                           " \"reward_funcs\": [\"math\", \"format_answer\"], \"beta\": 0.04}}");
  }
  static void TearDownTestSuite() {
    delete d_;
    d_ = nullptr;
  }
  // `ptk <cmd>` on recipe `file` into run folder `run`, on `device` (the recipe key run.device).
  static std::string stage(const std::string& cmd, const std::string& file, const std::string& run,
                           const std::string& device, const std::string& extra = "") {
    return test::ptk_binary() + " " + cmd + " --threads 4 --recipe " + d_->file(file) + " run.dir=" + d_->file(run) +
           " run.device=" + device + " " + extra;
  }
  // Runs `cmd` on the CPU and on the GPU; returns {cpu metrics, cuda metrics}.
  static std::pair<Metrics, Metrics> both(const std::string& cmd, const std::string& file, size_t steps) {
    Metrics m[2];
    const char* devices[2] = {"cpu", "cuda"};
    for (int i = 0; i < 2; ++i) {
      const std::string run = cmd + "-" + devices[i];
      auto r = test::run(stage(cmd, file, run, devices[i]));
      EXPECT_EQ(r.exit_code, 0) << r.out;
      if (r.exit_code != 0) return {};
      m[i] = read_metrics(d_->file(run));
      EXPECT_EQ(m[i].size(), steps) << cmd << " on " << devices[i];
      if (m[i].size() != steps) return {};
    }
    return {std::move(m[0]), std::move(m[1])};
  }
  static test::TempDir* d_;
};
test::TempDir* CudaStages::d_ = nullptr;

TEST_F(CudaStages, SftBf16OnCudaTracksFp32OnCpuOver50Steps) {
  PTK_NEED_GPU();
  ASSERT_NE(d_, nullptr);
  auto [cpu, cuda] = both("sft", "sft.json", 50);
  ASSERT_EQ(cpu.size(), 50u);
  bool identical = true;
  double cpu_tail = 0, cuda_tail = 0;
  for (size_t s = 0; s < 50; ++s) {
    const std::string step = "step " + std::to_string(s + 1);
    EXPECT_EQ(num(cuda[s], "num_tokens"), num(cpu[s], "num_tokens")) << step << ": not the same rows";
    const double lc = num(cpu[s], "loss"), lg = num(cuda[s], "loss");
    EXPECT_TRUE(within_tol(step + " loss", lg, lc, 1e-2, 1e-2));
    EXPECT_TRUE(std::isfinite(num(cuda[s], "grad_norm"))) << step;
    identical = identical && lg == lc;
    if (s >= 40) cpu_tail += lc / 10, cuda_tail += lg / 10;
  }
  EXPECT_TRUE(within_tol("mean loss of steps 41-50", cuda_tail, cpu_tail, 5e-3, 5e-3));
  // The comparison shows something only if training moved the loss.
  EXPECT_LT(cpu_tail, num(cpu[0], "loss") - 0.5) << "the CPU run did not learn: the comparison shows nothing";
  EXPECT_FALSE(identical) << "run.device=cuda gave the CPU's fp32 losses bit for bit: the stage did not run on the "
                             "GPU in bf16 (is run.device read by `ptk sft`?)";
}

TEST_F(CudaStages, DpoStepsOnCudaMatchTheCpu) {
  PTK_NEED_GPU();
  ASSERT_NE(d_, nullptr);
  auto [cpu, cuda] = both("dpo", "dpo.json", 2);
  ASSERT_EQ(cpu.size(), 2u);
  for (size_t s = 0; s < 2; ++s) {
    const std::string step = "dpo step " + std::to_string(s + 1);
    EXPECT_TRUE(within_tol(step + " loss", num(cuda[s], "loss"), num(cpu[s], "loss"), 0, 3e-2));
    for (const char* k : {"logps/chosen", "logps/rejected"})
      EXPECT_TRUE(within_tol(step + " " + k, num(cuda[s], k), num(cpu[s], k), 2e-2, 1e-1));
    EXPECT_TRUE(within_tol(step + " rewards/margins", num(cuda[s], "rewards/margins"), num(cpu[s], "rewards/margins"), 0, 1e-1));
    EXPECT_TRUE(within_tol(step + " grad_norm", num(cuda[s], "grad_norm"), num(cpu[s], "grad_norm"), 1e-1, 1e-3));
  }
}

TEST_F(CudaStages, RmStepsOnCudaMatchTheCpu) {
  PTK_NEED_GPU();
  ASSERT_NE(d_, nullptr);
  auto [cpu, cuda] = both("rm", "rm.json", 2);
  ASSERT_EQ(cpu.size(), 2u);
  for (size_t s = 0; s < 2; ++s) {
    const std::string step = "rm step " + std::to_string(s + 1);
    EXPECT_TRUE(within_tol(step + " loss", num(cuda[s], "loss"), num(cpu[s], "loss"), 0, 3e-2));
    EXPECT_TRUE(within_tol(step + " margin", num(cuda[s], "margin"), num(cpu[s], "margin"), 0, 1e-1));
    EXPECT_TRUE(within_tol(step + " grad_norm", num(cuda[s], "grad_norm"), num(cpu[s], "grad_norm"), 2e-1, 1e-3));
  }
}

TEST_F(CudaStages, GrpoStepOnCudaRollsOutTheSamePrompts) {
  PTK_NEED_GPU();
  ASSERT_NE(d_, nullptr);
  auto [cpu, cuda] = both("grpo", "grpo.json", 1);
  ASSERT_EQ(cpu.size(), 1u);
  for (const char* k : {"loss", "grad_norm", "reward", "completions/mean_length"})
    EXPECT_TRUE(std::isfinite(num(cuda[0], k))) << k << " on cuda: " << num(cuda[0], k);
  EXPECT_TRUE(within_tol("kl at step 1 (policy = reference)", num(cuda[0], "kl"), 0.0, 0, 1e-3));
  auto prompts = [](const std::string& run) {
    std::istringstream in(read_file(d_->file(run + "/rollouts/step-1.jsonl")));
    std::vector<std::string> out;
    for (std::string l; std::getline(in, l);)
      if (!l.empty()) out.push_back(json::to_string(json::parse(l, run)["prompt"]));
    return out;
  };
  auto pc = prompts("grpo-cpu"), pg = prompts("grpo-cuda");
  EXPECT_EQ(pg.size(), 8u);  // train.micro_batch_size completions: 2 prompts x 4
  EXPECT_EQ(pg, pc) << "the GPU run rolled out other prompts, or in another order";
}

}  // namespace
}  // namespace ptk
