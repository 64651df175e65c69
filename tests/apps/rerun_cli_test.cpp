// issue 26, a TRL user's first hour, through the `ptk` binary on a tiny random model (make-data's
// byte tokenizer): rerunning a finished recipe says so and exits 0; a changed training key is
// refused with the differences before anything in the run folder is rebuilt or rewritten; keys that
// do not change training do not block; resume=never starts over. `ptk prepare --recipe` takes a
// stage recipe and prepares what the stage then reuses. A model.path / --model that is not a model
// folder is named as such; ptk eval writes beside the run, not into the model folder; TRL key names
// on the command line get ptk's; a warm-up longer than the run warns.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "core/util/fs.h"
#include "core/util/json.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_model_json.h"

namespace ptk {
namespace {

namespace fs = std::filesystem;

class RerunCli : public ::testing::Test {
 protected:
  void SetUp() override {
    auto r = test::run(test::ptk_binary() + " make-data arithmetic --out " + d_.file("data") +
                       " --train 32 --eval 8 --tokenizer bytes");
    ASSERT_EQ(r.exit_code, 0) << r.out;
    d_.write("model.json", test::kTinyByteModelJson);
    d_.write("sft.json", "{\"model\": {\"config\": \"" + d_.file("model.json") + "\"},\n"
                         " \"tokenizer\": {\"path\": \"" + d_.file("data") + "\"},\n"
                         " \"data\": {\"train\": [\"" + d_.file("data/sft_train.jsonl") + "\"], \"max_seq_len\": 128},\n"
                         " \"train\": {\"max_steps\": 2, \"micro_batch_size\": 2},\n"
                         " \"optim\": {\"lr\": 1e-3},\n"
                         " \"checkpoint\": {\"every\": 2}}");
  }
  std::string sft(const std::string& extra, const std::string& run = "run") {
    return test::ptk_binary() + " sft --threads 1 --recipe " + d_.file("sft.json") + " run.dir=" + d_.file(run) + " " +
           extra;
  }
  test::TempDir d_;
};

TEST_F(RerunCli, FinishedRunSaysSoAndAChangedRecipeIsRefusedBeforeAnythingIsWritten) {
  auto r = test::run(sft(""));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  ASSERT_TRUE(path_exists(d_.file("run/finished.json"))) << r.out;
  const std::string config = read_file(d_.file("run/config.json")), metrics = read_file(d_.file("run/metrics.jsonl"));
  const auto manifest_time = fs::last_write_time(d_.file("run/data/train/manifest.json"));
  const auto final_time = fs::last_write_time(d_.file("run/final/model.safetensors"));

  // The same recipe again: finished, exit 0, no step loop and no throughput figures.
  auto again = test::run(sft(""));
  EXPECT_EQ(again.exit_code, 0) << again.out;
  EXPECT_NE(again.out.find("sft run " + d_.file("run") + " finished at step 2"), std::string::npos) << again.out;
  EXPECT_NE(again.out.find("final/ is at " + d_.file("run") + "/final"), std::string::npos) << again.out;
  EXPECT_NE(again.out.find("resume=never"), std::string::npos) << again.out;
  EXPECT_EQ(again.out.find("steps/s"), std::string::npos) << again.out;
  EXPECT_EQ(again.out.find("tok/s"), std::string::npos) << again.out;
  // Keys that do not change training do not make it another run.
  auto neutral = test::run(sft("train.log_every=5 train.eval_every=1 checkpoint.keep_last=3 run.threads=2"));
  EXPECT_EQ(neutral.exit_code, 0) << neutral.out;
  EXPECT_NE(neutral.out.find("finished at step 2"), std::string::npos) << neutral.out;

  // A changed learning rate and sequence length: refused with both differences and the ways out.
  auto changed = test::run(sft("optim.lr=5e-4 data.max_seq_len=64"));
  EXPECT_EQ(changed.exit_code, 1) << changed.out;
  EXPECT_NE(changed.out.find("optim.lr: 0.001 → 0.0005"), std::string::npos) << changed.out;
  EXPECT_NE(changed.out.find("data.max_seq_len: 128 → 64"), std::string::npos) << changed.out;
  EXPECT_NE(changed.out.find("resume=never"), std::string::npos) << changed.out;
  EXPECT_NE(changed.out.find("run.dir="), std::string::npos) << changed.out;
  // ... before anything was prepared, loaded or written.
  EXPECT_EQ(changed.out.find("prepare:"), std::string::npos) << changed.out;
  EXPECT_EQ(read_file(d_.file("run/config.json")), config);
  EXPECT_EQ(read_file(d_.file("run/metrics.jsonl")), metrics);
  EXPECT_TRUE(fs::last_write_time(d_.file("run/data/train/manifest.json")) == manifest_time) << "shards rebuilt";
  EXPECT_TRUE(fs::last_write_time(d_.file("run/final/model.safetensors")) == final_time) << "final/ rewritten";

  // resume=never trains the new recipe from step 0 in the folder.
  auto fresh = test::run(sft("optim.lr=5e-4 resume=never"));
  ASSERT_EQ(fresh.exit_code, 0) << fresh.out;
  EXPECT_EQ(fresh.out.find("resumed from"), std::string::npos) << fresh.out;
  EXPECT_EQ(json::parse(read_file(d_.file("run/config.json")), "config.json")["optim"]["lr"].GetDouble(), 5e-4);
  // And the folder is now a finished run of that recipe.
  auto after = test::run(sft("optim.lr=5e-4"));
  EXPECT_EQ(after.exit_code, 0) << after.out;
  EXPECT_NE(after.out.find("finished at step 2"), std::string::npos) << after.out;
}

TEST_F(RerunCli, PrepareTakesAStageRecipeAndTheStageReusesIt) {
  auto p = test::run(test::ptk_binary() + " prepare --threads 1 --recipe " + d_.file("sft.json") + " run.dir=" +
                     d_.file("run"));
  ASSERT_EQ(p.exit_code, 0) << p.out;
  EXPECT_NE(p.out.find("as a sft recipe"), std::string::npos) << p.out;
  ASSERT_TRUE(path_exists(d_.file("run/data/train/manifest.json"))) << p.out;
  auto r = test::run(sft("train.max_steps=1"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("prepare: " + d_.file("run/data/train") + " is up to date"), std::string::npos) << r.out;

  // A DPO recipe (its `dpo` section and the training keys) prepares preference pairs.
  d_.write("dpo.json", "{\"model\": {\"path\": \"" + d_.file("run/final") + "\"},\n"
                       " \"data\": {\"train\": [\"" + d_.file("data/preference_train.jsonl") + "\"], \"max_seq_len\": 128},\n"
                       " \"train\": {\"max_steps\": 2, \"micro_batch_size\": 2}, \"optim\": {\"lr\": 1e-4},\n"
                       " \"dpo\": {\"beta\": 0.1}}");
  auto dp = test::run(test::ptk_binary() + " prepare --threads 1 --recipe " + d_.file("dpo.json") + " run.dir=" +
                      d_.file("dpo"));
  ASSERT_EQ(dp.exit_code, 0) << dp.out;
  EXPECT_NE(dp.out.find("as a dpo recipe (it has a `dpo` section): preference data"), std::string::npos) << dp.out;
  auto manifest = json::parse(read_file(d_.file("dpo/data/train/manifest.json")), "manifest");
  EXPECT_NE(json::to_string(manifest).find("preference"), std::string::npos) << json::to_string(manifest);
  // --stage rm: the reward model's rule for over-long pairs (dropped).
  auto rm = test::run(test::ptk_binary() + " prepare --threads 1 --stage rm --recipe " + d_.file("dpo.json") +
                      " run.dir=" + d_.file("rm"));
  EXPECT_NE(rm.exit_code, 0) << "a dpo section is not an rm recipe key: " << rm.out;
  EXPECT_NE(rm.out.find("unknown key dpo"), std::string::npos) << rm.out;
}

TEST_F(RerunCli, WrongModelFolderIsNamedAndEvalWritesBesideTheRun) {
  // A tokenizer-only folder as model.path.
  auto r = test::run(sft("model.config= model.path=" + d_.file("data")));
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("model.path = " + d_.file("data") + " is not a model folder: has no config.json and no "
                       "model.safetensors"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("tokenizer files only"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("holds config.json, model.safetensors"), std::string::npos) << r.out;
  EXPECT_FALSE(std::filesystem::exists(d_.file("run"))) << "a refused start left a run folder behind";

  ASSERT_EQ(test::run(sft("")).exit_code, 0);
  // A run folder as model.path: the hint names its final/.
  auto run_dir = test::run(sft("model.config= model.path=" + d_.file("run"), "other"));
  EXPECT_EQ(run_dir.exit_code, 1) << run_dir.out;
  EXPECT_NE(run_dir.out.find("use model.path=" + d_.file("run") + "/final"), std::string::npos) << run_dir.out;
  // ptk eval and ptk generate check --model the same way.
  auto e = test::run(test::ptk_binary() + " eval --threads 1 --model " + d_.file("data") + " --data " +
                     d_.file("data/rl_eval.jsonl"));
  EXPECT_EQ(e.exit_code, 1) << e.out;
  EXPECT_NE(e.out.find("--model = " + d_.file("data") + " is not a model folder"), std::string::npos) << e.out;
  d_.write("prompts.jsonl", "{\"prompt\": \"1+1=\"}\n");
  auto g = test::run(test::ptk_binary() + " generate --threads 1 --model " + d_.file("run/final/config.json") +
                     " --input " + d_.file("prompts.jsonl") + " --output " + d_.file("out.jsonl"));
  EXPECT_EQ(g.exit_code, 1) << g.out;
  EXPECT_NE(g.out.find("it is a file, not a folder"), std::string::npos) << g.out;

  // A tokenizer with more ids than the model's embedding rows: refused by eval and generate, as the
  // training stages refuse it (an added token beyond the byte tokenizer's 259).
  fs::copy(d_.file("run/final"), d_.file("big"), fs::copy_options::recursive);
  std::string tj = read_file(d_.file("big/tokenizer.json"));
  const std::string list = "\"added_tokens\": [";
  ASSERT_NE(tj.find(list), std::string::npos);
  tj.insert(tj.find(list) + list.size(), "{\"id\": 400, \"content\": \"<|extra|>\", \"single_word\": false, "
                                         "\"lstrip\": false, \"rstrip\": false, \"normalized\": false, \"special\": true},");
  d_.write("big/tokenizer.json", tj);
  for (const std::string& cmd : {" generate --threads 1 --model " + d_.file("big") + " --input " + d_.file("prompts.jsonl") +
                                     " --output " + d_.file("out.jsonl"),
                                 " eval --threads 1 --model " + d_.file("big") + " --data " + d_.file("data/rl_eval.jsonl")}) {
    auto v = test::run(test::ptk_binary() + cmd);
    EXPECT_EQ(v.exit_code, 1) << v.out;
    EXPECT_NE(v.out.find("has 260 ids but the model at " + d_.file("big") + " has vocab_size 259"), std::string::npos)
        << cmd << "\n" << v.out;
  }

  // ptk eval without --output writes into the run folder, not into final/.
  auto ok = test::run(test::ptk_binary() + " eval --threads 1 --model " + d_.file("run/final") + " --data " +
                      d_.file("data/rl_eval.jsonl") + " --limit 2 --max-new-tokens 4");
  ASSERT_EQ(ok.exit_code, 0) << ok.out;
  EXPECT_TRUE(path_exists(d_.file("run/eval/final-rl_eval.json"))) << ok.out;
  EXPECT_FALSE(path_exists(d_.file("run/final/eval.json"))) << ok.out;
  EXPECT_NE(ok.out.find("wrote " + d_.file("run/eval/final-rl_eval.json")), std::string::npos) << ok.out;
}

TEST_F(RerunCli, TrlKeysOnTheCommandLineAndALongWarmup) {
  auto r = test::run(sft("learning_rate=1e-4 per_device_train_batch_size=4 --check"));
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("command line: unknown key learning_rate (did you mean optim.lr?"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("unknown key per_device_train_batch_size (did you mean train.micro_batch_size?"),
            std::string::npos)
      << r.out;
  auto w = test::run(sft("optim.warmup_steps=5 checkpoint.every=0", "warm"));
  ASSERT_EQ(w.exit_code, 0) << w.out;
  EXPECT_NE(w.out.find("optim.warmup_steps=5 is not shorter than this run's 2 optimizer steps"), std::string::npos)
      << w.out;
  auto quiet = test::run(sft("optim.warmup_steps=1 checkpoint.every=0", "warm1"));
  ASSERT_EQ(quiet.exit_code, 0) << quiet.out;
  EXPECT_EQ(quiet.out.find("is not shorter than this run"), std::string::npos) << quiet.out;
}

}  // namespace
}  // namespace ptk
