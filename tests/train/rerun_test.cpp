// Safe reruns (core/train/rerun.h) on run folders made by hand: which recipe differences block a
// resume and which do not, the refusal's wording (key: saved → now, the ways out), a finished run
// stopping with RunAlreadyFinished, a longer run continuing from a checkpoint, an explicit
// resume=<checkpoint> compared with that checkpoint's recipe, and that the check writes nothing.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "core/train/rerun.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "tests/support/test_util.h"

namespace ptk::train {
namespace {

std::vector<std::string> logged;
void log_line(const std::string& s) { logged.push_back(s); }

std::string recipe(const std::string& lr = "0.001", int64_t max_steps = 4, int64_t log_every = 1,
                   const std::string& extra = "") {
  return "{\"resume\": \"auto\", \"run\": {\"dir\": \"x\", \"seed\": 1234, \"threads\": 0},\n"
         " \"data\": {\"train\": [{\"path\": \"a.jsonl\", \"weight\": 1.0}], \"eval\": [], \"max_seq_len\": 128},\n"
         " \"train\": {\"epochs\": 1, \"max_steps\": " + std::to_string(max_steps) + ", \"log_every\": " +
         std::to_string(log_every) + ", \"eval_every\": 2},\n"
         " \"optim\": {\"lr\": " + lr + ", \"betas\": [0.9, 0.999]},\n"
         " \"checkpoint\": {\"every\": 2, \"keep_last\": 2}" + extra + "}\n";
}

// A run folder as the trainer leaves it: config.json, a complete checkpoint at `ckpt_step` (none
// when < 0), and with `finished` final/ plus finished.json.
void make_run(const test::TempDir& d, const std::string& saved, int64_t ckpt_step, bool finished) {
  d.write("run/config.json", saved);
  if (ckpt_step >= 0) {
    const std::string c = "run/checkpoints/step-" + std::to_string(ckpt_step);
    d.write(c + "/config.json", "{}");
    d.write(c + "/model.safetensors", "x");
    d.write(c + "/trainer_state/recipe.json", saved);
    d.write(c + "/DONE", "");
  }
  if (finished) {
    d.write("run/final/config.json", "{}");
    d.write("run/final/model.safetensors", "x");
    write_finished_marker(d.file("run"), 4, 4);
  }
}

TEST(RecipeChanges, LeafByLeafInKeyOrderListsWhole) {
  auto c = recipe_changes(recipe("0.001", 4), recipe("0.0005", 4, 1, ", \"extra\": {\"only_now\": 1}"));
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0].key, "optim.lr");
  EXPECT_EQ(c[0].saved, "0.001");
  EXPECT_EQ(c[0].now, "0.0005");
  // A list compares whole; a key only one side has is not compared (another ptk version's recipe).
  auto l = recipe_changes("{\"optim\": {\"betas\": [0.9, 0.999]}, \"old\": 1}", "{\"optim\": {\"betas\": [0.9, 0.95]}}");
  ASSERT_EQ(l.size(), 1u);
  EXPECT_EQ(l[0].key, "optim.betas");
  EXPECT_EQ(l[0].now, "[0.9,0.95]");
  EXPECT_THROW(recipe_changes("[1]", "{}"), Error);
}

// data.columns is one value: a mapping added, removed or swapped is a change of data.columns (as
// leaves, a key only one side has was skipped, so {"chosen": "rejected", ...} resumed silently).
TEST(RecipeChanges, ColumnMappingComparedWhole) {
  auto added = recipe_changes(R"({"data": {"columns": {}}})", R"({"data": {"columns": {"prompt": "question"}}})");
  ASSERT_EQ(added.size(), 1u);
  EXPECT_EQ(added[0].key, "data.columns");
  auto swapped = recipe_changes(R"({"data": {"columns": {"chosen": "a", "rejected": "b"}}})",
                                R"({"data": {"columns": {"chosen": "b", "rejected": "a"}}})");
  ASSERT_EQ(swapped.size(), 1u);
  EXPECT_EQ(swapped[0].key, "data.columns");
  EXPECT_TRUE(changes_training("data.columns"));
}

// train.zero1=true and train.sharding=zero1 are one mode: a run started with either spelling (or
// before train.sharding existed) resumes under the other; another mode is a change.
TEST(RecipeChanges, ZeroOneSpellingsAreTheSameMode) {
  const char* old_run = R"({"train": {"zero1": true}})";
  const char* old_new = R"({"train": {"zero1": true, "sharding": "none"}})";
  const char* now = R"({"train": {"zero1": false, "sharding": "zero1"}})";
  EXPECT_TRUE(recipe_changes(old_run, now).empty());
  EXPECT_TRUE(recipe_changes(old_new, now).empty());
  EXPECT_TRUE(recipe_changes(now, old_new).empty());
  auto c = recipe_changes(old_new, R"({"train": {"zero1": false, "sharding": "zero2"}})");
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0].key, "train.sharding");
  EXPECT_EQ(recipe_changes(R"({"train": {"zero1": false, "sharding": "none"}})", now).size(), 1u);
}

TEST(RecipeChanges, WhatBlocksAResume) {
  for (const char* k : {"optim.lr", "data.max_seq_len", "data.train", "model.path", "train.micro_batch_size",
                        "train.grad_accum", "run.seed", "dpo.beta", "grpo.num_generations", "tokenizer.chat_template",
                        "model.dtype", "optim.warmup_steps", "data.eval_split", "data.columns.prompt"})
    EXPECT_TRUE(changes_training(k)) << k;
  for (const char* k : {"resume", "run.dir", "run.threads", "train.log_every", "train.eval_every", "train.memory_check",
                        "checkpoint.every", "checkpoint.keep_last", "checkpoint.max_shard_size", "dist.timeout_s",
                        "data.eval", "sft.eval_prompts", "sft.eval_micro_batch_size", "dpo.eval_max_new_tokens",
                        "grpo.eval_num_samples", "rollout.slots", "grpo.reward_urls", "dpo.precompute_ref_log_probs",
                        "train.tensorboard"})
    EXPECT_FALSE(changes_training(k)) << k;
  // Prefix matches stop at a key boundary: data.evaluation would be a training key.
  EXPECT_TRUE(changes_training("data.evaluation"));
  EXPECT_TRUE(sets_length("train.max_steps"));
  EXPECT_TRUE(sets_length("train.epochs"));
  EXPECT_FALSE(sets_length("train.grad_accum"));
}

TEST(CheckRerun, ChangedTrainingKeyIsRefusedWithTheDifferencesAndTheWaysOut) {
  test::TempDir d;
  make_run(d, recipe("0.001"), 2, false);
  const std::string before = read_file(d.file("run/config.json"));
  try {
    check_rerun(d.file("run"), "auto", recipe("0.0005", 4, 1, ", \"model\": {\"dtype\": \"auto\"}"), "sft", log_line);
    FAIL() << "a changed optim.lr resumed";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("optim.lr: 0.001 → 0.0005"), std::string::npos) << m;
    EXPECT_NE(m.find("checkpoints/step-2"), std::string::npos) << m;
    EXPECT_NE(m.find("resume=never"), std::string::npos) << m;
    EXPECT_NE(m.find("run.dir="), std::string::npos) << m;
    EXPECT_EQ(m.find("model.dtype"), std::string::npos) << "a key the saved recipe lacks was listed: " << m;
  }
  EXPECT_EQ(read_file(d.file("run/config.json")), before) << "the check wrote config.json";
  EXPECT_FALSE(path_exists(d.file("run/.ptk-run.lock"))) << "the check touched the folder";
  // resume=never starts over, whatever the folder holds.
  EXPECT_NO_THROW(check_rerun(d.file("run"), "never", recipe("0.0005"), "sft", log_line));
}

TEST(CheckRerun, NeutralKeysDoNotBlock) {
  test::TempDir d;
  make_run(d, recipe("0.001", 4, 1), 2, false);
  std::string now = recipe("0.001", 4, 10);
  now.replace(now.find("\"threads\": 0"), 12, "\"threads\": 7");
  EXPECT_NO_THROW(check_rerun(d.file("run"), "auto", now, "sft", log_line));
}

TEST(CheckRerun, FinishedRunSaysSoAndLongerRunContinues) {
  test::TempDir d;
  make_run(d, recipe("0.001", 4), 2, true);
  try {
    check_rerun(d.file("run"), "auto", recipe("0.001", 4, 5), "sft", log_line);  // log_every only: still finished
    FAIL() << "a finished run was not reported";
  } catch (const RunAlreadyFinished& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("finished at step 4"), std::string::npos) << m;
    EXPECT_NE(m.find(d.file("run") + "/final"), std::string::npos) << m;
    EXPECT_NE(m.find("resume=never"), std::string::npos) << m;
  }
  // More steps: continues from checkpoints/step-2, saying so.
  logged.clear();
  EXPECT_NO_THROW(check_rerun(d.file("run"), "auto", recipe("0.001", 6), "sft", log_line));
  ASSERT_EQ(logged.size(), 1u);
  EXPECT_NE(logged[0].find("train.max_steps changed 4 → 6"), std::string::npos) << logged[0];
  // A changed lr on a finished run is refused like any other.
  EXPECT_THROW(check_rerun(d.file("run"), "auto", recipe("0.002", 4), "sft", log_line), Error);
  // Once a new run started training in the folder (finished.json gone), it is no longer finished.
  clear_finished_marker(d.file("run"));
  EXPECT_EQ(finished_step(d.file("run")), -1);
  EXPECT_NO_THROW(check_rerun(d.file("run"), "auto", recipe("0.001", 4), "sft", log_line));
}

TEST(CheckRerun, LongerRunWithoutACheckpointIsRefused) {
  test::TempDir d;
  make_run(d, recipe("0.001", 4), -1, true);
  try {
    check_rerun(d.file("run"), "auto", recipe("0.001", 8), "sft", log_line);
    FAIL() << "a finished run without checkpoints restarted from step 0";
  } catch (const RunAlreadyFinished&) {
    FAIL() << "a changed max_steps is not the same recipe";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("train.max_steps: 4 → 8"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("no checkpoint to continue from"), std::string::npos) << e.what();
  }
}

TEST(CheckRerun, EmptyOrCheckpointlessFolderStartsFresh) {
  test::TempDir d;
  EXPECT_NO_THROW(check_rerun(d.file("nothing"), "auto", recipe(), "sft", log_line));
  EXPECT_FALSE(path_exists(d.file("nothing"))) << "the check created the folder";
  d.write("run/config.json", recipe("0.5"));  // a run that crashed before its first checkpoint
  EXPECT_NO_THROW(check_rerun(d.file("run"), "auto", recipe("0.001"), "sft", log_line));
}

TEST(CheckRerun, ExplicitCheckpointIsComparedWithItsOwnRecipe) {
  test::TempDir d;
  make_run(d, recipe("0.001"), 2, false);
  const std::string ckpt = d.file("run/checkpoints/step-2");
  EXPECT_NO_THROW(check_rerun(d.file("other"), ckpt, recipe("0.001", 8), "sft", log_line));  // longer is fine
  try {
    check_rerun(d.file("other"), ckpt, recipe("0.01"), "sft", log_line);
    FAIL() << "resume=<checkpoint> with another lr";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("optim.lr: 0.001 → 0.01"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("model.path=" + ckpt + " resume=never"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ptk::train
