// `ptk dpo` end to end on a tiny model: make-data's byte tokenizer and preference pairs, a 2-step
// `ptk sft` final/ as the policy and reference, metrics with TRL's names, the reference cache, final/
// as an HF folder, resume on rerun, SimPO (no reference), two ranks through `ptk launch` equal to one
// rank (parameters and metrics), recipe errors; and the real ../shared/data pairs for a few steps
// (skipped when the folder is absent).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <sstream>

#include "core/util/fs.h"
#include "core/util/json.h"
#include "tests/datasets/shared_data.h"
#include "tests/support/run_folders.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_model_json.h"

namespace ptk {
namespace {

class DpoCli : public ::testing::Test {
 protected:
  void SetUp() override {
    auto r = test::run(test::ptk_binary() + " make-data arithmetic --out " + d_.file("data") +
                       " --train 24 --eval 8 --tokenizer bytes");
    ASSERT_EQ(r.exit_code, 0) << r.out;
    d_.write("model.json", test::kTinyByteModelJson);
    d_.write("sft.json", "{\"model\": {\"config\": \"" + d_.file("model.json") + "\"},\n"
                         " \"tokenizer\": {\"path\": \"" + d_.file("data") + "\"},\n"
                         " \"data\": {\"train\": [\"" + d_.file("data/sft_train.jsonl") + "\"], \"max_seq_len\": 128},\n"
                         " \"train\": {\"max_steps\": 2, \"micro_batch_size\": 2}, \"checkpoint\": {\"every\": 0}}");
    r = test::run(test::ptk_binary() + " sft --threads 1 --recipe " + d_.file("sft.json") + " run.dir=" + d_.file("sft"));
    ASSERT_EQ(r.exit_code, 0) << r.out;
    d_.write("dpo.json", "{\"model\": {\"path\": \"" + d_.file("sft/final") + "\"},\n"
                         " \"data\": {\"train\": [\"" + d_.file("data/preference_train.jsonl") + "\"], \"eval\": [\"" +
                         d_.file("data/preference_eval.jsonl") + "\"], \"max_seq_len\": 128},\n"
                         " \"train\": {\"max_steps\": 4, \"micro_batch_size\": 2, \"grad_accum\": 2, \"eval_every\": 2},\n"
                         " \"optim\": {\"lr\": 1e-3, \"warmup_steps\": 1},\n"
                         " \"checkpoint\": {\"every\": 2},\n"
                         " \"dpo\": {\"beta\": 0.1}}");
  }
  std::string dpo(const std::string& extra, const std::string& run = "run") {
    return test::ptk_binary() + " dpo --threads 1 --recipe " + d_.file("dpo.json") + " run.dir=" + d_.file(run) + " " +
           extra;
  }
  std::vector<std::string> metric_lines(const std::string& run = "run") {
    std::istringstream in(read_file(d_.file(run + "/metrics.jsonl")));
    std::vector<std::string> out;
    for (std::string l; std::getline(in, l);) out.push_back(l);
    return out;
  }
  test::TempDir d_;
};

TEST_F(DpoCli, TrainsWritesFinalWithTrlMetricsAndResumes) {
  auto r = test::run(dpo(""));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("computing reference log-probs"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("dpo: wrote"), std::string::npos) << r.out;
  for (const char* f : {"final/config.json", "final/model.safetensors", "final/tokenizer.json", "config.json"})
    EXPECT_TRUE(path_exists(d_.file("run/" + std::string(f)))) << f;
  bool cache = false;
  for (auto& e : std::filesystem::directory_iterator(d_.file("run/data")))
    cache = cache || e.path().filename().string().rfind("train-ref_logps-", 0) == 0;
  EXPECT_TRUE(cache) << "no train-ref_logps-*.safetensors beside the prepared shards";
  auto lines = metric_lines();
  ASSERT_EQ(lines.size(), 4u);
  auto last = json::parse(lines.back(), "metrics");
  for (const char* k : {"loss", "lr", "grad_norm", "tokens_per_s", "rewards/chosen", "rewards/rejected",
                        "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen",
                        "logits/rejected", "entropy", "mean_token_accuracy", "eval/loss", "eval/rewards/accuracies",
                        "eval/rewards/margins"})
    EXPECT_TRUE(last.HasMember(k)) << k << " missing in " << lines.back();
  // Step 1 starts at the reference: every reward is 0, the sigmoid loss log 2.
  auto first = json::parse(lines.front(), "metrics");
  EXPECT_NEAR(first["loss"].GetDouble(), std::log(2.0), 1e-4) << lines.front();
  EXPECT_NEAR(first["rewards/margins"].GetDouble(), 0.0, 1e-5);
  // Rerun with more steps: resumes from step 4 and reuses the reference cache.
  auto again = test::run(dpo("train.max_steps=6"));
  ASSERT_EQ(again.exit_code, 0) << again.out;
  EXPECT_NE(again.out.find("reusing reference log-probs"), std::string::npos) << again.out;
  EXPECT_EQ(again.out.find("computing reference log-probs"), std::string::npos) << again.out;
  EXPECT_EQ(metric_lines().size(), 6u);
}

// issue 26: dpo.precompute_ref_log_probs=auto (the default) precomputes only when the pass costs no
// more reference forwards than the run does live. 1 step x 4 pairs + 1 eval x 8 pairs = 12 live
// forwards against a 24 + 8 pair pass: live, no cache written. The run above (4 steps, 3 evals: 16 +
// 24 = 40 against 32) precomputed. true forces the pass whatever the length.
TEST_F(DpoCli, AutoReferencePrecomputesOnlyWhenTheRunCoversTheData) {
  auto r = test::run(dpo("train.max_steps=1 train.eval_every=0", "short"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("dpo: reference log-probs live (auto: 1 steps x 4 pairs = 4 trained pairs + 1 evals x 8 pairs "
                       "= 12 live reference forwards vs 32 for the pass"),
            std::string::npos)
      << r.out;
  EXPECT_EQ(r.out.find("computing reference log-probs"), std::string::npos) << r.out;
  for (auto& e : std::filesystem::directory_iterator(d_.file("short/data")))
    EXPECT_NE(e.path().filename().string().rfind("train-ref_logps-", 0), 0u) << "a cache was written: " << e.path();
  auto forced = test::run(dpo("train.max_steps=1 train.eval_every=0 dpo.precompute_ref_log_probs=true", "forced"));
  ASSERT_EQ(forced.exit_code, 0) << forced.out;
  EXPECT_NE(forced.out.find("reference log-probs precomputed (dpo.precompute_ref_log_probs=true)"), std::string::npos)
      << forced.out;
  EXPECT_NE(forced.out.find("computing reference log-probs"), std::string::npos) << forced.out;
  auto h = test::run(test::ptk_binary() + " dpo --help");
  EXPECT_NE(h.out.find("dpo.precompute_ref_log_probs"), std::string::npos);
  EXPECT_NE(h.out.find("auto|true|false"), std::string::npos) << h.out;
}

// dpo.eval_prompts: the SFT model's held-out accuracy before the first step, and the policy's at
// the last eval, through ptk eval's code (the last equals `ptk eval` on final/).
TEST_F(DpoCli, HeldoutAccuracyBeforeAndAfter) {
  auto r = test::run(dpo("train.max_steps=2 dpo.eval_prompts=" + d_.file("data/rl_eval.jsonl") +
                         " dpo.eval_max_new_tokens=12"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("dpo: before training, held-out accuracy"), std::string::npos) << r.out;
  ASSERT_TRUE(path_exists(d_.file("run/eval_start.json")));
  auto last = json::parse(metric_lines().back(), "metrics");
  ASSERT_TRUE(last.HasMember("eval/accuracy"));
  ASSERT_TRUE(last.HasMember("eval/rewards/accuracies")) << "pair metrics must stay beside held-out accuracy";
  auto e = test::run(test::ptk_binary() + " eval --threads 1 --model " + d_.file("run/final") + " --data " +
                     d_.file("data/rl_eval.jsonl") + " --max-new-tokens 12 --output " + d_.file("eval.json"));
  ASSERT_EQ(e.exit_code, 0) << e.out;
  auto ev = json::parse(read_file(d_.file("eval.json")), "eval.json");
  EXPECT_NEAR(last["eval/completions/mean_length"].GetDouble(), ev["mean_length"].GetDouble(), 1e-9);
  EXPECT_NEAR(last["eval/accuracy"].GetDouble(), ev["accuracy"].GetDouble(), 1e-12);
}

TEST_F(DpoCli, SimpoLoadsNoReference) {
  auto r = test::run(dpo("dpo.algorithm=cpo dpo.loss_type=simpo dpo.cpo_alpha=0 dpo.beta=2.0 train.max_steps=2"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(r.out.find("reference log-probs"), std::string::npos) << r.out;
  auto last = json::parse(metric_lines().back(), "metrics");
  EXPECT_TRUE(last.HasMember("nll_loss"));
  EXPECT_TRUE(last.HasMember("rewards/margins"));
}

// 2 ranks × micro-batch 1 vs 1 rank × micro-batch 2 (grad_accum 2 both): the loader cuts each
// global micro-batch into per-rank parts, so both see the same 4 pairs a step, and N = K·ranks makes
// the loss the same 4-pair mean. Parameters after 3 steps and every per-step metric must agree,
// with a live reference and with a precomputed one (rank 0 writes the cache, rank 1 reads it).
TEST_F(DpoCli, TwoRanksEqualOneRank) {
  for (bool live : {true, false}) {
    SCOPED_TRACE(live ? "live reference" : "precomputed reference");
    // optim.eps=1e-5: see dpo_invariants_test (AdamW amplifies the summation noise of near-zero
    // gradient elements by lr/eps; 1e-5 keeps that below 1e-5 while a wrong shard moves every weight).
    const std::string common = std::string("train.max_steps=3 optim.warmup_steps=0 optim.eps=1e-5 checkpoint.every=0 ") +
                               (live ? "dpo.precompute_ref_log_probs=false " : "");
    const std::string one = live ? "one-live" : "one-pre", two = live ? "two-live" : "two-pre";
    auto r = test::run(dpo(common + "train.micro_batch_size=2", one));
    ASSERT_EQ(r.exit_code, 0) << r.out;
    r = test::run(test::ptk_binary() + " launch -n 2 -- " + dpo(common + "train.micro_batch_size=1", two));
    ASSERT_EQ(r.exit_code, 0) << r.out;
    // ZeRO-2 (gradient shards reduce-scattered each micro-batch): 2 ranks x 1 pair x grad_accum 2 (the
    // recipe's) against 1 rank accumulating the same 4 pairs a step over 4 micro-batches.
    const std::string accum = live ? "accum-live" : "accum-pre", zero2 = live ? "zero2-live" : "zero2-pre";
    r = test::run(dpo(common + "train.micro_batch_size=1 train.grad_accum=4", accum));
    ASSERT_EQ(r.exit_code, 0) << r.out;
    r = test::run(test::ptk_binary() + " launch -n 2 -- " +
                  dpo(common + "train.micro_batch_size=1 train.sharding=zero2", zero2));
    ASSERT_EQ(r.exit_code, 0) << r.out;
    const double zero2_diff = test::max_param_diff(test::final_params(d_.file(accum)), test::final_params(d_.file(zero2)));
    std::printf("dpo %s reference: 2 ranks zero2 x 1 pair x grad_accum 2 vs 1 rank x 1 pair x grad_accum 4: "
                "max |param diff| %.3g\n",
                live ? "live" : "precomputed", zero2_diff);
    EXPECT_LE(zero2_diff, 1e-5);
    auto p1 = test::final_params(d_.file(one));
    EXPECT_LE(test::max_param_diff(p1, test::final_params(d_.file(zero2))), 1e-5) << "zero2 vs 1 rank x 2 pairs x 2";
    double diff = test::max_param_diff(p1, test::final_params(d_.file(two)));
    double moved = test::max_moved(test::final_params(d_.file("sft")), p1);
    std::printf("dpo %s reference: 2 ranks x 1 pair vs 1 rank x 2 pairs after 3 steps: max |param diff| %.3g "
                "(moved %.3g)\n", live ? "live" : "precomputed", diff, moved);
    // fp32; the runs differ in padding (1 vs 2 pairs a batch) and in the order gradients are summed.
    EXPECT_LE(diff, 1e-5);
    EXPECT_GT(moved, 1e-4) << "the policy did not train: the comparison would be empty";
    auto a = test::metric_docs(d_.file(one)), b = test::metric_docs(d_.file(two));
    ASSERT_EQ(a.size(), 3u);
    ASSERT_EQ(b.size(), 3u);
    for (size_t i = 0; i < a.size(); ++i) {
      SCOPED_TRACE("step " + std::to_string(i + 1) + ": 1 rank vs 2 ranks");
      // Every metric but timing. Sums over ~20 tokens of fp32 log-probs and a 2-rank gradient sum:
      // 1e-5 relative to max(1, |x|).
      EXPECT_GE(test::expect_metrics_close(a[i], b[i], 1e-5), 15u);
    }
    EXPECT_NEAR(a[0]["loss"].GetDouble(), std::log(2.0), 1e-4) << "step 1 starts at the reference";
  }
}

TEST_F(DpoCli, RecipeErrorsNameTheKey) {
  auto r = test::run(dpo("'dpo.loss_type=[\"sigmoid\",\"ipo\"]' dpo.loss_weights=[1.0]"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find("loss_weights has 1"), std::string::npos) << r.out;
  r = test::run(dpo("dpo.loss_type=simpo"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find("dpo.algorithm=cpo"), std::string::npos) << r.out;
  r = test::run(dpo("dpo.ref_path=" + d_.file("nowhere")));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find("nowhere"), std::string::npos) << r.out;
  auto h = test::run(test::ptk_binary() + " dpo --help");
  EXPECT_EQ(h.exit_code, 0);
  for (const char* k : {"dpo.loss_type", "dpo.precompute_ref_log_probs", "dpo.simpo_gamma", "dpo.ref_path"})
    EXPECT_NE(h.out.find(k), std::string::npos) << k;
}

// issue 24: the chosen and rejected rows double the batch the estimate counts; refused before the
// policy, reference or data are loaded, naming the key.
TEST_F(DpoCli, HugeMicroBatchIsRefusedBeforeLoading) {
  auto r = test::run(dpo("train.micro_batch_size=1000000000"));
  EXPECT_NE(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("dpo: train.micro_batch_size=1000000000 pairs (2000000000 rows) x data.max_seq_len=128 needs ~"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("lower train.micro_batch_size to "), std::string::npos) << r.out;
  EXPECT_FALSE(path_exists(d_.file("run/data"))) << "data was prepared before the refusal";
}

// Real preference pairs (LLaMA-Factory's dpo_en_demo, chat message lists) through the byte tokenizer
// for a few steps: the stage reads them, prepares, trains, and the numbers are finite.
TEST_F(DpoCli, RealSharedPreferenceData) {
  std::string shared = test::shared_dir();
  if (shared.empty() || !path_exists(shared + "/data/preference")) PTK_SKIP_WITHOUT("shared") << "../shared/data is absent";
  std::string lines;
  for (auto& s : test::map_shared_data(shared + "/data"))
    if (s.name == "preference/dpo_en_demo")
      for (size_t i = 0; i < s.lines.size() && i < 24; ++i) lines += s.lines[i] + "\n";
  ASSERT_FALSE(lines.empty());
  std::string f = d_.write("real.jsonl", lines);
  auto r = test::run(dpo("'data.train=[\"" + f + "\"]' data.eval=[] data.max_seq_len=256 train.max_steps=2 "
                         "checkpoint.every=0",
                         "real"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  for (auto& l : metric_lines("real")) {
    auto m = json::parse(l, "metrics");
    EXPECT_TRUE(std::isfinite(m["loss"].GetDouble())) << l;
    EXPECT_TRUE(m["logps/chosen"].IsNumber()) << l;
  }
}

}  // namespace
}  // namespace ptk
