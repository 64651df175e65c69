// `ptk rm`'s invariants, run through the binary on a tiny random Qwen2 (hidden 32, 2 layers; a score
// head is added) with the byte tokenizer and 16 hand-written pairs with margins, centering on:
// micro-batch × accumulation splits of the same 4-pair step give the same parameters; 2 ranks
// (`ptk launch -n 2`) give the parameters and metrics of 1 rank with the same global batch; a run
// stopped at step 3 (mid-epoch) and resumed to step 6 equals the run that never stopped, bit for
// bit, in fp32 and with bf16 weights (fp32 master weights and moments in the checkpoint).
// Not the loss numbers (rm_stage_test, tests/rm_loss).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "core/util/fs.h"
#include "tests/support/pair_runs.h"
#include "tests/support/run_folders.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

class RmInvariants : public ::testing::Test {
 protected:
  // The starting model (an "SFT final/" without a score head), the pairs with margins and the
  // recipe, written once (tests/support/pair_runs.h).
  static void SetUpTestSuite() {
    dir_ = new test::TempDir();
    test::write_pair_inputs(*dir_, /*margins=*/true);
    dir_->write("rm.json", test::pair_recipe(*dir_, 5, "\"rm\": {\"center_rewards_coefficient\": 0.01}"));
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }

  // `ptk rm` (one thread: bit-for-bit reruns) into dir_/<run>; `launch` prefixes e.g. "launch -n 2 --".
  static test::RunResult rm(const std::string& run, const std::string& overrides, const std::string& launch = "") {
    std::string pre = launch.empty() ? "" : test::ptk_binary() + " " + launch + " ";
    return test::run(pre + test::ptk_binary() + " rm --threads 1 --recipe " + dir_->file("rm.json") +
                     " run.dir=" + dir_->file(run) + " " + overrides);
  }
  static std::string run(const std::string& name) { return dir_->file(name); }
  // How far training moved the transformer (the score head is new, so it has no start).
  static double moved(const std::string& name) {
    return test::max_moved(test::folder_params(dir_->file("start")), test::final_params(run(name)));
  }

  static test::TempDir* dir_;
};
test::TempDir* RmInvariants::dir_ = nullptr;

// AdamW turns the summation-order noise d of a gradient element near 0 into an update change of up
// to lr·d/eps: with the default eps=1e-8 a few elements end ~1e-5 apart after 3 steps whatever the
// stage does. eps=1e-5, still far below the typical |g| here, keeps that under ~3e-6 (measured),
// while a wrong split or shard moves every parameter by ~lr (3e-3).
constexpr const char* kEps = "optim.eps=1e-5 ";

// 4 pairs a step as 4×1, 2×2 and 1×4 (micro-batch × grad_accum): each micro-batch's mean loss is
// weighted by its pairs / the step's pairs, so the step's loss is the 4-pair mean whatever the split.
TEST_F(RmInvariants, MicroBatchTimesAccumulationSplitsGiveTheSameParameters) {
  for (auto [b, k] : {std::pair<int, int>{4, 1}, {2, 2}, {1, 4}}) {
    std::string name = "split" + std::to_string(b) + "x" + std::to_string(k);
    auto r = rm(name, std::string(kEps) + "train.max_steps=3 train.micro_batch_size=" + std::to_string(b) +
                          " train.grad_accum=" + std::to_string(k));
    ASSERT_EQ(r.exit_code, 0) << name << ":\n" << r.out;
  }
  auto want = test::final_params(run("split4x1"));
  EXPECT_GT(moved("split4x1"), 1e-3) << "3 steps at lr 3e-3 did not move the model: the comparison would be empty";
  auto want_m = test::metric_docs(run("split4x1"));
  ASSERT_EQ(want_m.size(), 3u);
  for (const char* name : {"split2x2", "split1x4"}) {
    SCOPED_TRACE(name);
    double diff = test::max_param_diff(want, test::final_params(run(name)));
    std::printf("rm %s vs 4x1 after 3 steps: max |param diff| %.3g\n", name, diff);
    // fp32: the splits differ only in padding and summation order (~1e-7 relative per step).
    EXPECT_LE(diff, 1e-5);
    auto m = test::metric_docs(run(name));
    ASSERT_EQ(m.size(), want_m.size());
    for (size_t i = 0; i < m.size(); ++i) {
      SCOPED_TRACE("step " + std::to_string(i + 1));
      // accuracy, margin and mean_reward are means over equal micro-batches: the 4-pair values. Not
      // min_reward/max_reward: per micro-batch, then averaged over micro-batches (as TRL logs them).
      // 1e-5 relative to max(1, |x|): fp32 sums in another order and padding.
      test::expect_listed_metrics_close(want_m[i], m[i], 1e-5,
                                        {"loss", "grad_norm", "accuracy", "margin", "mean_reward", "num_tokens",
                                         "eval/loss", "eval/accuracy", "eval/min_reward", "eval/max_reward"});
    }
  }
}

// 2 ranks × micro-batch 1 vs 1 rank × micro-batch 2, grad_accum 2 both: the loader cuts each global
// micro-batch into per-rank parts, so both see the same 4 pairs a step. Parameters after 3 steps and
// every metric must agree, min_reward/max_reward included (over both ranks' scores, as TRL gathers).
TEST_F(RmInvariants, TwoRanksEqualOneRank) {
  const std::string common = std::string(kEps) + "train.max_steps=3 train.grad_accum=2 train.eval_every=2 ";
  auto r = rm("one", common + "train.micro_batch_size=2");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  r = rm("two", common + "train.micro_batch_size=1", "launch -n 2 --");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  double diff = test::max_param_diff(run("one"), run("two"));
  std::printf("rm: 2 ranks x 1 pair vs 1 rank x 2 pairs after 3 steps: max |param diff| %.3g (moved %.3g)\n", diff,
              moved("one"));
  // fp32; the runs differ in padding (1 vs 2 pairs a batch) and in the order gradients are summed.
  EXPECT_LE(diff, 1e-5);
  EXPECT_GT(moved("one"), 1e-3) << "the model did not train: the comparison would be empty";
  auto a = test::metric_docs(run("one")), b = test::metric_docs(run("two"));
  ASSERT_EQ(a.size(), 3u);
  ASSERT_EQ(b.size(), 3u);
  for (size_t i = 0; i < a.size(); ++i) {
    SCOPED_TRACE("step " + std::to_string(i + 1) + ": 1 rank vs 2 ranks");
    // Every metric but timing, 1e-5 relative to max(1, |x|): fp32 sums in another order and padding.
    EXPECT_GE(test::expect_metrics_close(a[i], b[i], 1e-5), 12u);
  }
  EXPECT_TRUE(a[1].HasMember("eval/loss"));
}

// Stopped at step 3 (train.max_steps=3; the step-3 checkpoint is 6 of 8 micro-batches into the first
// epoch) and resumed to step 6 with the same recipe otherwise, vs 6 steps in one go. The schedule is
// constant after a 2-step warmup so that max_steps=3 does not change the first steps' learning
// rates. Evals at steps 2, 4 and 6 straddle the resume; steps 5-6 are in epoch 2. Equal to the bit,
// metrics lines included: same thread count, same data order, same optimizer state.
TEST_F(RmInvariants, ResumeEqualsUninterruptedRun) {
  const std::string common =
      "train.micro_batch_size=2 train.grad_accum=2 train.eval_every=2 checkpoint.every=3 optim.schedule=constant "
      "optim.warmup_steps=2 ";
  for (const char* dtype : {"float32", "bfloat16"}) {
    SCOPED_TRACE(dtype);
    std::string full = std::string("full-") + dtype, stopped = std::string("resumed-") + dtype;
    std::string ov = common + "model.dtype=" + dtype + " ";
    auto r = rm(full, ov + "train.max_steps=6");
    ASSERT_EQ(r.exit_code, 0) << r.out;
    r = rm(stopped, ov + "train.max_steps=3");
    ASSERT_EQ(r.exit_code, 0) << r.out;
    ASSERT_TRUE(path_exists(run(stopped) + "/checkpoints/step-3/DONE"));
    ASSERT_EQ(test::metric_docs(run(stopped)).size(), 3u);
    test::expect_resumable_checkpoint(run(stopped) + "/checkpoints/step-3", 0, 6, std::string(dtype) == "bfloat16");
    r = rm(stopped, ov + "train.max_steps=6");
    ASSERT_EQ(r.exit_code, 0) << r.out;
    ASSERT_NE(r.out.find("resumed from"), std::string::npos) << r.out;
    auto want = test::final_params(run(full));
    EXPECT_EQ(want.begin()->second.scalar_type(), std::string(dtype) == "float32" ? torch::kFloat32 : torch::kBFloat16)
        << "model.dtype=" << dtype << " saved another dtype";
    double diff = test::max_param_diff(want, test::final_params(run(stopped)));
    std::printf("rm %s: stopped at 3, resumed to 6 vs 6 straight: max |param diff| %.3g\n", dtype, diff);
    EXPECT_EQ(diff, 0.0);
    EXPECT_GT(moved(full), 1e-3) << "the model did not train";
    auto a = test::metric_docs(run(full)), b = test::metric_docs(run(stopped));
    ASSERT_EQ(a.size(), 6u);
    ASSERT_EQ(b.size(), 6u);
    // Step 3's line is the stopped run's last: it has that run's final eval, the uninterrupted one none.
    for (size_t i = 0; i < a.size(); ++i)
      EXPECT_EQ(test::without_timing(a[i], i == 2), test::without_timing(b[i], i == 2)) << "step " << i + 1;
    EXPECT_TRUE(a[3].HasMember("eval/loss")) << "no eval after the resume";
  }
}

}  // namespace
}  // namespace ptk
