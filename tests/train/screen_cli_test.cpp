// What `ptk sft`, `ptk dpo` and `ptk rm` show on a tiny run (random-init 2-layer model, make-data's
// byte tokenizer): each stage's own metrics in its progress line, one line per eval with the eval
// metrics, the end-of-run summary naming final/ and report.md, report.md with the stage's tables and
// curves (not SFT's for DPO and RM), TensorBoard event files in run/tb, and train.tensorboard=false.
#include <gtest/gtest.h>

#include <filesystem>

#include "core/util/fs.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_model_json.h"

namespace ptk {
namespace {

namespace fs = std::filesystem;

int event_files(const std::string& dir) {
  if (!fs::is_directory(dir)) return 0;
  int n = 0;
  for (auto& e : fs::directory_iterator(dir)) n += e.path().filename().string().rfind("events.out.tfevents.", 0) == 0;
  return n;
}

class ScreenCli : public ::testing::Test {
 protected:
  void SetUp() override {
    auto r = test::run(test::ptk_binary() + " make-data arithmetic --out " + d_.file("data") +
                       " --train 64 --eval 16 --tokenizer bytes");
    ASSERT_EQ(r.exit_code, 0) << r.out;
    d_.write("model.json", test::kTinyByteModelJson);
  }
  // A stage recipe: `data` names make-data's files, `extra` adds sections.
  std::string recipe(const std::string& name, const std::string& model, const std::string& data,
                     const std::string& extra) {
    return d_.write(name + ".json",
                    "{\"model\": " + model + ",\n \"tokenizer\": {\"path\": \"" + d_.file("data") + "\"},\n" +
                        " \"data\": {\"train\": [\"" + d_.file("data/" + data + "_train.jsonl") + "\"], \"eval\": [\"" +
                        d_.file("data/" + data + "_eval.jsonl") + "\"], \"max_seq_len\": 128},\n" +
                        " \"train\": {\"max_steps\": 4, \"micro_batch_size\": 2, \"eval_every\": 2},\n" +
                        " \"optim\": {\"lr\": 1e-3}" + extra + "}");
  }
  test::RunResult stage(const std::string& command, const std::string& recipe_file, const std::string& extra = "") {
    return test::run("PTK_PROGRESS_INTERVAL=0 " + test::ptk_binary() + " " + command + " --threads 1 --recipe " +
                     recipe_file + " run.dir=" + d_.file(command) + " " + extra);
  }
  test::TempDir d_;
};

TEST_F(ScreenCli, EachStageShowsItsMetricsEvalsSummaryAndReport) {
  const std::string sft = d_.file("sft");
  auto r = stage("sft", recipe("sft", "{\"config\": \"" + d_.file("model.json") + "\"}", "sft", ""));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  // Progress lines: step, ETA/elapsed, the stage's metrics with units, throughput.
  EXPECT_NE(r.out.find("sft 2/4 steps (50.0%)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| mean_token_accuracy "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(" tok/s"), std::string::npos) << r.out;
  // One line per eval, when it runs.
  EXPECT_NE(r.out.find("sft eval at step 2/4: loss "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("sft eval at step 4/4: loss "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| mean_token_accuracy ", r.out.find("sft eval at step 2/4")), std::string::npos) << r.out;
  // The summary.
  EXPECT_NE(r.out.find("sft finished: step 4/4 in "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("last eval (step 4): loss "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("best eval: loss "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("final model: " + sft + "/final"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("report: " + sft + "/report.md"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("tensorboard --logdir " + sft + "/tb"), std::string::npos) << r.out;
  EXPECT_EQ(event_files(sft + "/tb"), 1);
  const std::string md = read_file(sft + "/report.md");
  EXPECT_NE(md.find("## Eval results\n\n| step | eval/loss | eval/mean_token_accuracy |"), std::string::npos) << md;
  EXPECT_NE(md.find("\n| 2 | "), std::string::npos) << md;
  EXPECT_NE(md.find("## Training metrics (every 1 step, and the last)\n\n| step | loss | mean_token_accuracy |"),
            std::string::npos)
      << md;
  EXPECT_NE(md.find("![mean_token_accuracy](plots/mean_token_accuracy.svg)"), std::string::npos) << md;

  // DPO from the SFT model: rewards/accuracies and margins on screen and in report.md, none of SFT's.
  auto dpo = stage("dpo", recipe("dpo", "{\"path\": \"" + sft + "/final\"}", "preference", ""));
  ASSERT_EQ(dpo.exit_code, 0) << dpo.out;
  EXPECT_NE(dpo.out.find("dpo 4/4 steps (100.0%)"), std::string::npos) << dpo.out;
  for (const char* m : {"| rewards/accuracies ", "| rewards/margins "}) EXPECT_NE(dpo.out.find(m), std::string::npos) << m;
  EXPECT_NE(dpo.out.find("dpo eval at step 2/4: loss "), std::string::npos) << dpo.out;
  EXPECT_NE(dpo.out.find("% | rewards/margins ", dpo.out.find("dpo eval at step 2/4")), std::string::npos) << dpo.out;
  EXPECT_NE(dpo.out.find("dpo finished: step 4/4"), std::string::npos) << dpo.out;
  const std::string dmd = read_file(d_.file("dpo/report.md"));
  EXPECT_NE(dmd.find("| step | eval/loss | eval/rewards/accuracies | eval/rewards/margins |"), std::string::npos) << dmd;
  EXPECT_NE(dmd.find("| step | loss | rewards/accuracies | rewards/margins |"), std::string::npos) << dmd;
  EXPECT_NE(dmd.find("![rewards/accuracies](plots/rewards_accuracies.svg)"), std::string::npos) << dmd;
  EXPECT_EQ(dmd.find("![mean_token_accuracy]"), std::string::npos) << dmd;

  // RM: accuracy in %, its own report; no TensorBoard files when turned off.
  auto rm = stage("rm", recipe("rm", "{\"path\": \"" + sft + "/final\"}", "preference", ""), "train.tensorboard=false");
  ASSERT_EQ(rm.exit_code, 0) << rm.out;
  EXPECT_NE(rm.out.find("| accuracy "), std::string::npos) << rm.out;
  EXPECT_NE(rm.out.find("rm eval at step 2/4: loss "), std::string::npos) << rm.out;
  EXPECT_NE(rm.out.find("rm finished: step 4/4"), std::string::npos) << rm.out;
  EXPECT_EQ(rm.out.find("tensorboard --logdir"), std::string::npos) << rm.out;
  EXPECT_EQ(event_files(d_.file("rm/tb")), 0);
  const std::string rmd = read_file(d_.file("rm/report.md"));
  EXPECT_NE(rmd.find("| step | eval/loss | eval/accuracy |"), std::string::npos) << rmd;
  EXPECT_NE(rmd.find("![accuracy](plots/accuracy.svg)"), std::string::npos) << rmd;
}

}  // namespace
}  // namespace ptk
