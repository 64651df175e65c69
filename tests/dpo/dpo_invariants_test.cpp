// `ptk dpo`'s invariants, run through the binary on a tiny random Qwen2 (hidden 32, 2 layers) with
// the byte tokenizer and 16 hand-written pairs: micro-batch × accumulation splits of the same
// 4-pair step give the same parameters and pair metrics; a run stopped at step 3 (mid-epoch) and
// resumed to step 6 equals the run that never stopped, bit for bit, with a precomputed and a live
// reference, in fp32 and with bf16 weights (fp32 master weights and moments in the checkpoint).
// Two ranks vs one: dpo_cli_test's TwoRanksEqualOneRank. Not the loss numbers (dpo_stage_test).
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

// The starting policy (and reference), the pairs and the recipe, written once (tests/support/pair_runs.h).
class DpoInvariants : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir();
    test::write_pair_inputs(*dir_, /*margins=*/false);
    dir_->write("dpo.json", test::pair_recipe(*dir_, 3, "\"dpo\": {\"beta\": 0.1}"));
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }

  // Runs `ptk dpo` (one thread: bit-for-bit reruns) into dir_/<run>; fails the test on an error.
  static void dpo(const std::string& run, const std::string& overrides) {
    auto r = test::run(test::ptk_binary() + " dpo --threads 1 --recipe " + dir_->file("dpo.json") +
                       " run.dir=" + dir_->file(run) + " " + overrides);
    ASSERT_EQ(r.exit_code, 0) << run << ":\n" << r.out;
  }
  static std::string run(const std::string& name) { return dir_->file(name); }

  static test::TempDir* dir_;
};
test::TempDir* DpoInvariants::dir_ = nullptr;

// AdamW turns the summation-order noise d of a gradient element near 0 into an update change of up
// to lr·d/eps: DPO's chosen-minus-rejected gradients nearly cancel on the embedding rows of bytes no
// pair uses, and with the default eps=1e-8 a few of those elements end 5e-5 apart after 3 steps
// whatever the stage does. eps=1e-5, still far below the typical |g| (~5e-3 here), keeps that under
// ~2e-6 (measured), while a wrong split or shard moves every parameter by ~lr (3e-3).
constexpr const char* kEps = "optim.eps=1e-5";

// 4 pairs a step as 4×1, 2×2 and 1×4 (micro-batch × grad_accum): each micro-batch counts one target,
// so the loss is the mean over micro-batches of pair means, i.e. the 4-pair mean whatever the split
// (the loader hands out the same 4 rows per step, datasets/loader.h). 3 steps, precomputed reference.
TEST_F(DpoInvariants, MicroBatchTimesAccumulationSplitsGiveTheSameParameters) {
  const std::vector<std::pair<int, int>> splits = {{4, 1}, {2, 2}, {1, 4}};
  for (auto [b, k] : splits)
    ASSERT_NO_FATAL_FAILURE(dpo("split" + std::to_string(b) + "x" + std::to_string(k),
        std::string(kEps) + " train.max_steps=3 train.micro_batch_size=" + std::to_string(b) +
            " train.grad_accum=" + std::to_string(k)));
  auto want = test::final_params(run("split4x1"));
  double moved = test::max_moved(test::folder_params(dir_->file("start")), want);
  EXPECT_GT(moved, 1e-3) << "3 steps at lr 3e-3 did not move the policy: the comparison would be empty";
  auto want_m = test::metric_docs(run("split4x1"));
  ASSERT_EQ(want_m.size(), 3u);
  for (auto [b, k] : {std::pair<int, int>{2, 2}, {1, 4}}) {
    std::string name = "split" + std::to_string(b) + "x" + std::to_string(k);
    SCOPED_TRACE(name);
    double diff = test::max_param_diff(want, test::final_params(run(name)));
    std::printf("dpo %s vs 4x1 after 3 steps: max |param diff| %.3g (moved %.3g)\n", name.c_str(), diff, moved);
    // fp32: the splits differ only in padding and summation order (~1e-7 relative per step).
    EXPECT_LE(diff, 1e-5);
    auto m = test::metric_docs(run(name));
    ASSERT_EQ(m.size(), want_m.size());
    for (size_t i = 0; i < m.size(); ++i) {
      SCOPED_TRACE("step " + std::to_string(i + 1));
      // Pair metrics are per-micro-batch pair means averaged over equal micro-batches: the 4-pair
      // mean in every split. (Token-weighted ones, entropy and mean_token_accuracy, are per-micro-batch
      // token ratios averaged over micro-batches, as TRL logs them, so they legitimately differ.)
      // logps are sums over ~10 tokens of fp32 log-probs: 1e-5 relative covers the padding change.
      test::expect_listed_metrics_close(want_m[i], m[i], 1e-5,
                                        {"loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins",
                                         "logps/chosen", "logps/rejected", "eval/loss", "eval/rewards/margins"});
      EXPECT_EQ(want_m[i]["num_tokens"].GetDouble(), m[i]["num_tokens"].GetDouble());
    }
  }
}

// Stopped at step 3 (train.max_steps=3; the checkpoint of step 3 is 6 of 8 micro-batches into the
// first epoch) and resumed to step 6 with the same recipe otherwise, vs 6 steps in one go. The
// schedule is constant after a 2-step warmup so that max_steps=3 does not change the first steps'
// learning rates. Evals at steps 2, 4 and 6 straddle the resume; steps 5-6 are in epoch 2 (the
// cursor crossed an epoch boundary after restoring). Equal to the bit, metrics lines included:
// same thread count, same data order, same optimizer state.
struct ResumeCase {
  const char* name;
  const char* overrides;
};

TEST_F(DpoInvariants, ResumeEqualsUninterruptedRun) {
  const std::string common =
      "train.micro_batch_size=2 train.grad_accum=2 train.eval_every=2 checkpoint.every=3 optim.schedule=constant "
      "optim.warmup_steps=2 ";
  // Each reference mode once and each dtype once (every combination would double the run time).
  for (const ResumeCase& c : {ResumeCase{"precomputed-fp32", "dpo.precompute_ref_log_probs=true"},
                              ResumeCase{"live-bf16", "dpo.precompute_ref_log_probs=false model.dtype=bfloat16"}}) {
    SCOPED_TRACE(c.name);
    std::string full = std::string("full-") + c.name, stopped = std::string("resumed-") + c.name;
    ASSERT_NO_FATAL_FAILURE(dpo(full, common + "train.max_steps=6 " + c.overrides));
    ASSERT_NO_FATAL_FAILURE(dpo(stopped, common + "train.max_steps=3 " + c.overrides));
    ASSERT_TRUE(path_exists(run(stopped) + "/checkpoints/step-3/DONE"));
    ASSERT_EQ(test::metric_docs(run(stopped)).size(), 3u);
    test::expect_resumable_checkpoint(run(stopped) + "/checkpoints/step-3", 0, 6,
                                      std::string(c.name).find("bf16") != std::string::npos);
    auto r = test::run(test::ptk_binary() + " dpo --threads 1 --recipe " + dir_->file("dpo.json") + " run.dir=" +
                       run(stopped) + " " + common + "train.max_steps=6 " + c.overrides);
    ASSERT_EQ(r.exit_code, 0) << r.out;
    ASSERT_NE(r.out.find("resumed from"), std::string::npos) << r.out;
    auto want = test::final_params(run(full)), got = test::final_params(run(stopped));
    const bool bf16 = std::string(c.name).find("bf16") != std::string::npos;
    EXPECT_EQ(want.begin()->second.scalar_type(), bf16 ? torch::kBFloat16 : torch::kFloat32)
        << "model.dtype saved another dtype";
    double diff = test::max_param_diff(want, got);
    std::printf("dpo %s: stopped at 3, resumed to 6 vs 6 straight: max |param diff| %.3g\n", c.name, diff);
    EXPECT_EQ(diff, 0.0);
    EXPECT_GT(test::max_moved(test::folder_params(dir_->file("start")), want), 1e-3) << "the policy did not train";
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
