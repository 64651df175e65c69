// Invariants of the real SFT stage (issue #32), through `ptk sft` on a tiny random model (hidden 32,
// 2 layers, byte tokenizer), comparing the tensors of final/model.safetensors:
// - micro-batch x accumulation splits of the same rows (4x1, 2x2, 1x4) and 2 ranks end with the
//   parameters of 1 rank x 4 rows after 4 optimizer steps, on packed chat rows and on unpacked
//   prompt/completion rows (completion-only loss, so micro-batches hold very different target
//   counts: the loss is normalized by the optimizer step's target count over every micro-batch and
//   rank, docs/FORMULAS.md section 1, not per micro-batch);
// - a run stopped at step 3 and rerun to step 6 (resume=auto from checkpoints/step-3, loader cursor
//   mid-epoch, packed rows) equals an uninterrupted 6-step run bit for bit, in fp32 and with bf16
//   parameters (fp32 master weights and moments), parameters, optimizer state and metrics alike.
// What the loss is (TRL's numbers) is sft_loss_test's; the test-only stage's invariants are
// tests/parallel/dp_trainer_test's.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>
#include <map>
#include <string>

#include "core/util/fs.h"
#include "core/util/json.h"
#include "tests/support/run_folders.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_model_json.h"

namespace ptk {
namespace {

// fp32 tolerance for "the same parameters / metrics" (relative for the loss and grad_norm): the
// splits and ranks add the same terms in another order (per-micro-batch partial sums, other padded
// widths, per-rank gradient sums), which moved these parameters by <= 1.1e-6 after 4 steps. With the
// loss normalized per micro-batch (TRL without num_items_in_batch: each micro-batch's token mean / K)
// they differed by 2.2e-4 (packed 2x2) to 1.4e-2 (unpacked 1x4), and the loss by > 2e-5 relative.
constexpr double kFp32Tol = 1e-5;

using Tensors = std::map<std::string, at::Tensor>;

class SftInvariants : public ::testing::Test {
 protected:
  void SetUp() override {
    // 128 chat documents pack ~4 to a row of 256 tokens: 32 packed rows.
    auto r = test::run(test::ptk_binary() + " make-data arithmetic --out " + d_.file("data") +
                       " --train 128 --eval 4 --tokenizer bytes");
    ASSERT_EQ(r.exit_code, 0) << r.out;
    d_.write("model.json", test::kTinyByteModelJson);  // 256 positions: the packed rows' max_seq_len
    // 64 prompt/completion records whose prompt (not a target) and completion (targets) lengths vary
    // independently, 17-67 target tokens each: micro-batches of the same step hold very different
    // target counts, which is where per-micro-batch normalization would show.
    std::string pc;
    for (int i = 0; i < 64; ++i) {
      int a = i * 7 % 97, b = i * 13 % 89;
      std::string please, really;
      for (int k = 0; k < i % 5; ++k) please += " please";
      for (int k = 0; k < i % 7; ++k) really += " Really.";
      pc += "{\"prompt\": \"Q" + std::to_string(i) + ": what is " + std::to_string(a) + " + " + std::to_string(b) + "?" +
            please + " \", \"completion\": \"The answer is " + std::to_string(a + b) + "." + really + "\"}\n";
    }
    d_.write("pc_train.jsonl", pc);
    d_.write("sft.json", "{\"model\": {\"config\": \"" + d_.file("model.json") + "\"},\n"
                         " \"tokenizer\": {\"path\": \"" + d_.file("data") + "\"},\n"
                         " \"data\": {\"train\": [\"" + d_.file("data/sft_train.jsonl") + "\"], \"max_seq_len\": 256},\n"
                         " \"train\": {\"max_steps\": 4, \"micro_batch_size\": 4},\n"
                         " \"optim\": {\"lr\": 3e-3, \"weight_decay\": 0.01}}");
  }

  // Runs `ptk sft` into d_/run with `extra` overrides, on `ranks` ranks through `ptk launch`;
  // one thread per rank (a resume is bit-for-bit only at the same thread count).
  void train(const std::string& run, const std::string& extra, int ranks = 1, std::string* out = nullptr) {
    std::string cmd = test::ptk_binary() + " sft --threads 1 --recipe " + d_.file("sft.json") + " run.dir=" +
                      d_.file(run) + " " + extra;
    if (ranks > 1) cmd = test::ptk_binary() + " launch -n " + std::to_string(ranks) + " -- " + cmd;
    auto r = test::run(cmd);
    ASSERT_EQ(r.exit_code, 0) << cmd << "\n" << r.out;
    if (out) *out = r.out;
  }
  Tensors final_params(const std::string& run) { return test::final_params(d_.file(run)); }

  test::TempDir d_;
};

// --- Splits and ranks ---------------------------------------------------------------------------

class SftSplits : public SftInvariants, public ::testing::WithParamInterface<const char*> {
 protected:
  std::string rows() {
    return std::string(GetParam()) == "packed"
               ? "data.train=" + d_.file("data/sft_train.jsonl") + " data.packing=true"
               : "data.train=" + d_.file("pc_train.jsonl") + " data.packing=false";
  }
};

// Four optimizer steps of the same 4 rows each (the loader gives W ranks x B rows, step by step, the
// rows 1 rank x W*B rows sees), within the first epoch (32 packed rows, 64 unpacked).
TEST_P(SftSplits, MicroBatchAccumulationSplitsAndTwoRanksGiveTheSameParameters) {
  const std::string base = rows() + " checkpoint.every=1 checkpoint.keep_last=4";
  ASSERT_NO_FATAL_FAILURE(train("ref", base + " train.micro_batch_size=4 train.grad_accum=1"));
  const Tensors ref = final_params("ref");
  const auto ref_m = test::metric_docs(d_.file("ref"));
  ASSERT_EQ(ref_m.size(), 4u);
  // The comparison means something only if the steps after the first moved the parameters well
  // beyond the tolerance.
  const double moved = test::max_param_diff(ref, test::folder_params(d_.file("ref/checkpoints/step-1")));
  EXPECT_GT(moved, 100 * kFp32Tol) << "steps 2-4 hardly moved the parameters";

  struct Split {
    int ranks, micro, accum;
    const char* sharding;
  };
  // Two ranks: 2 rows each in one micro-batch (packed), 1 row each in two micro-batches (unpacked:
  // the step's N then sums 2 micro-batches on each of 2 ranks). ZeRO-2: 2 ranks x 1 row x 2 micro-
  // batches, each micro-batch's gradient reduce-scattered into the ranks' shards, against 1 rank
  // accumulating (1x4, 2x2) or not (4x1).
  const bool packed = std::string(GetParam()) == "packed";
  for (Split s : {Split{1, 2, 2, "none"}, Split{1, 1, 4, "none"}, packed ? Split{2, 2, 1, "none"} : Split{2, 1, 2, "none"},
                  Split{2, 1, 2, "zero2"}}) {
    const std::string name = std::to_string(s.ranks) + "rank-" + std::to_string(s.micro) + "x" + std::to_string(s.accum) +
                             (std::string(s.sharding) == "none" ? "" : std::string("-") + s.sharding);
    SCOPED_TRACE(name + " vs 1 rank 4x1, " + GetParam() + " rows");
    ASSERT_NO_FATAL_FAILURE(train(name, base + " train.micro_batch_size=" + std::to_string(s.micro) +
                                            " train.grad_accum=" + std::to_string(s.accum) +
                                            " train.sharding=" + s.sharding, s.ranks));
    if (std::string(s.sharding) == "zero2")  // each rank wrote its own optimizer shard: ZeRO-2 ran
      for (const char* f : {"optimizer-rank-0.safetensors", "optimizer-rank-1.safetensors"})
        EXPECT_TRUE(path_exists(d_.file(name + "/checkpoints/step-4/trainer_state/") + f)) << f;
    const double diff = test::max_param_diff(final_params(name), ref);
    std::printf("%s rows, %s vs 1 rank 4x1 after 4 steps: max |param diff| %.3g (moved %.3g)\n", GetParam(),
                name.c_str(), diff, moved);
    EXPECT_LE(diff, kFp32Tol);
    auto m = test::metric_docs(d_.file(name));
    ASSERT_EQ(m.size(), ref_m.size());
    for (size_t i = 0; i < m.size(); ++i) {
      SCOPED_TRACE("step " + std::to_string(i + 1));
      // The step's loss is sum(nll) / N over all its micro-batches and ranks: the same value.
      EXPECT_NEAR(m[i]["loss"].GetDouble(), ref_m[i]["loss"].GetDouble(), kFp32Tol * ref_m[i]["loss"].GetDouble());
      EXPECT_NEAR(m[i]["grad_norm"].GetDouble(), ref_m[i]["grad_norm"].GetDouble(),
                  kFp32Tol * ref_m[i]["grad_norm"].GetDouble());
      EXPECT_EQ(m[i]["num_tokens"].GetDouble(), ref_m[i]["num_tokens"].GetDouble()) << "other rows were read";
      EXPECT_EQ(m[i]["learning_rate"].GetDouble(), ref_m[i]["learning_rate"].GetDouble());
      // One micro-batch split over ranks: accuracy's numerator and denominator are summed over ranks,
      // so it is the 1-rank figure. (With accumulation it is by TRL's definition the mean of
      // per-micro-batch figures, which differs.)
      if (s.accum == 1) {
        EXPECT_NEAR(m[i]["mean_token_accuracy"].GetDouble(), ref_m[i]["mean_token_accuracy"].GetDouble(), 1e-12);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Rows, SftSplits, ::testing::Values("packed", "unpacked"));

// --- Resume -------------------------------------------------------------------------------------

class SftResume : public SftInvariants, public ::testing::WithParamInterface<const char*> {};

// 6 steps of 2x2 packed rows (24 of the 32 rows), checkpoints every 3. The stopped run is the same
// recipe with train.max_steps=3, then rerun with max_steps=6: it resumes from checkpoints/step-3
// with the loader at micro-batch 6 of 16. train.max_steps sizes the lr schedule (as in HF), so
// a cosine schedule would differ between a 3-step and a 6-step run; a constant schedule whose
// warmup (5 steps) outlasts the stop keeps each step's lr independent of max_steps while making
// the resumed steps' lr depend on the restored step count. Threads are 1 in both runs: equality
// is expected bit for bit.
TEST_P(SftResume, StoppedAndRerunEqualsUninterruptedBitForBit) {
  const std::string dtype = GetParam();
  const std::string recipe = "data.packing=true train.micro_batch_size=2 train.grad_accum=2 optim.schedule=constant "
                             "optim.warmup_steps=5 checkpoint.every=3 model.dtype=" + dtype;
  ASSERT_NO_FATAL_FAILURE(train("full", recipe + " train.max_steps=6"));
  ASSERT_NO_FATAL_FAILURE(train("run", recipe + " train.max_steps=3"));
  std::string out;
  ASSERT_NO_FATAL_FAILURE(train("run", recipe + " train.max_steps=6", 1, &out));
  EXPECT_NE(out.find("resumed from " + d_.file("run/checkpoints/step-3") + " at step 3"), std::string::npos) << out;

  // The premise: packed rows, and the checkpoint's loader cursor (3 steps x 2 micro-batches) in the
  // middle of the first epoch, with AdamW's moments and, with bf16 parameters, fp32 master weights.
  const bool bf16 = dtype == "bfloat16";
  test::expect_resumable_checkpoint(d_.file("run/checkpoints/step-3"), 0, 6, bf16);
  auto state = json::parse_file(d_.file("run/checkpoints/step-3/trainer_state/state.json"));
  EXPECT_LT(state["cursor"]["rows"].GetInt64(), 128) << "rows are not packed (128 documents)";
  EXPECT_GT(state["cursor"]["rows"].GetInt64(), 2 * 2 * 6) << "the 6 steps cross an epoch boundary";

  // Parameters, in the trained dtype.
  const Tensors resumed = final_params("run"), full = final_params("full");
  for (auto& [name, t] : resumed) EXPECT_EQ(t.scalar_type(), bf16 ? at::kBFloat16 : at::kFloat) << name;
  EXPECT_EQ(test::max_param_diff(resumed, full), 0.0) << "the resumed run's parameters differ from the uninterrupted run's";
  const double moved = test::max_param_diff(full, test::folder_params(d_.file("full/checkpoints/step-3")));
  EXPECT_GT(moved, 1e-4) << "steps 4-6 hardly moved the parameters";

  // AdamW's state after step 6: moments (and with bf16 parameters the fp32 master weights), all of
  // which the resume restored from step-3 and carried through 3 more steps.
  test::expect_resumable_checkpoint(d_.file("run/checkpoints/step-6"), 0, 12, bf16);
  EXPECT_EQ(test::max_param_diff(test::optimizer_state(d_.file("run/checkpoints/step-6")),
                                 test::optimizer_state(d_.file("full/checkpoints/step-6"))),
            0.0)
      << "optimizer state differs";

  // metrics.jsonl: steps 1-3 kept from the first run, steps 4-6 those of the uninterrupted run,
  // every key but timing.
  auto a = test::metric_docs(d_.file("run")), b = test::metric_docs(d_.file("full"));
  ASSERT_EQ(a.size(), 6u);
  ASSERT_EQ(b.size(), 6u);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i]["step"].GetInt64(), static_cast<int64_t>(i + 1));
    EXPECT_EQ(test::without_timing(a[i]), test::without_timing(b[i])) << "step " << i + 1;
  }
}

INSTANTIATE_TEST_SUITE_P(Dtype, SftResume, ::testing::Values("float32", "bfloat16"));

}  // namespace
}  // namespace ptk
