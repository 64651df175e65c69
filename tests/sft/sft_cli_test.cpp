// `ptk sft` end to end on a tiny random model: make-data's byte tokenizer and chat data, packed
// rows, metrics with TRL's names, final/ as an HF folder, resume on rerun, two data-parallel ranks
// through `ptk launch`, and the run folder's temporaries: a failed write (full disk) removes its
// own, a killed run's are removed at the next start, a folder in use is refused.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <sstream>

#include "core/train/run_folder.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

const char* kModel = R"({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 259,
  "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
  "num_key_value_heads": 2, "max_position_embeddings": 128, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
  "hidden_act": "silu", "initializer_range": 0.02, "tie_word_embeddings": true, "use_sliding_window": false,
  "eos_token_id": 258, "pad_token_id": 256})";

class SftCli : public ::testing::Test {
 protected:
  void SetUp() override {
    auto r = test::run(test::ptk_binary() + " make-data arithmetic --out " + d_.file("data") +
                       " --train 64 --eval 16 --tokenizer bytes");
    ASSERT_EQ(r.exit_code, 0) << r.out;
    d_.write("model.json", kModel);
    d_.write("sft.json", "{\"model\": {\"config\": \"" + d_.file("model.json") + "\"},\n"
                         " \"tokenizer\": {\"path\": \"" + d_.file("data") + "\"},\n"
                         " \"data\": {\"train\": [\"" + d_.file("data/sft_train.jsonl") + "\"], \"eval\": [\"" +
                         d_.file("data/sft_eval.jsonl") + "\"], \"max_seq_len\": 128},\n"
                         " \"train\": {\"max_steps\": 4, \"micro_batch_size\": 2, \"eval_every\": 2},\n"
                         " \"optim\": {\"lr\": 1e-3, \"warmup_steps\": 1},\n"
                         " \"checkpoint\": {\"every\": 2}}");
  }
  std::string sft(const std::string& extra) {
    return test::ptk_binary() + " sft --threads 1 --recipe " + d_.file("sft.json") + " run.dir=" + d_.file("run") +
           " " + extra;
  }
  std::vector<std::string> metric_lines() {
    std::istringstream in(read_file(d_.file("run/metrics.jsonl")));
    std::vector<std::string> out;
    for (std::string l; std::getline(in, l);) out.push_back(l);
    return out;
  }
  test::TempDir d_;
};

TEST_F(SftCli, TrainsWritesFinalAndResumes) {
  auto r = test::run(sft(""));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  for (const char* f : {"final/config.json", "final/model.safetensors", "final/tokenizer.json", "config.json",
                        "checkpoints/step-4/trainer_state/state.json"})
    EXPECT_TRUE(path_exists(d_.file("run/") + f)) << f;
  auto lines = metric_lines();
  ASSERT_EQ(lines.size(), 4u);
  auto last = json::parse(lines.back(), "metrics");
  for (const char* k : {"loss", "learning_rate", "grad_norm", "mean_token_accuracy", "entropy", "num_tokens",
                        "tokens_per_s", "eval/loss", "eval/mean_token_accuracy"})
    EXPECT_TRUE(last.HasMember(k)) << k << " missing in " << lines.back();
  // Rerunning the same recipe with more steps resumes from step 4 and appends steps 5-6 to the
  // first run's lines. (That a resumed run equals an uninterrupted one, parameters, optimizer state
  // and metrics, is sft_invariants_test's SftResume; not here: train.max_steps sizes the cosine schedule,
  // so steps 1-4 followed a 4-step schedule and this run does not end where a 6-step run does.)
  auto again = test::run(sft("train.max_steps=6"));
  ASSERT_EQ(again.exit_code, 0) << again.out;
  EXPECT_NE(again.out.find("resumed from " + d_.file("run/checkpoints/step-4") + " at step 4"), std::string::npos)
      << again.out;
  auto after = metric_lines();
  ASSERT_EQ(after.size(), 6u);
  for (size_t i = 0; i < lines.size(); ++i) EXPECT_EQ(after[i], lines[i]) << "step " << i + 1 << " was rewritten";
}

// issue 24: sizes no machine holds are refused before the model, data or batches exist, naming the
// key (train.micro_batch_size=1e9 met the OOM killer; data.max_seq_len=1e9 died in std::bad_alloc
// while packing).
TEST_F(SftCli, HugeSizesAreRefusedBeforeAnythingIsAllocated) {
  auto r = test::run(sft("train.micro_batch_size=1000000000"));
  EXPECT_NE(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("sft: train.micro_batch_size=1000000000 x data.max_seq_len=128 needs ~"), std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("(hidden 32, 2 layers, vocab 259)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("lower train.micro_batch_size to "), std::string::npos) << r.out;
  EXPECT_FALSE(path_exists(d_.file("run/data"))) << "data was prepared before the refusal";
  r = test::run(sft("data.max_seq_len=1000000000"));
  EXPECT_NE(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("train.micro_batch_size=2 x data.max_seq_len=1000000000 needs ~"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("lower data.max_seq_len to "), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("bad_alloc"), std::string::npos) << r.out;
  EXPECT_FALSE(path_exists(d_.file("run/data"))) << "data was prepared before the refusal";
  auto h = test::run(test::ptk_binary() + " sft --help");
  EXPECT_NE(h.out.find("train.memory_check"), std::string::npos) << h.out;
}

// Recipe mistakes of issue 24 through the command: max_steps=0 and a key written twice.
TEST_F(SftCli, MaxStepsZeroAndRepeatedKeysAreRefused) {
  auto r = test::run(sft("train.max_steps=0"));
  EXPECT_NE(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("train.max_steps must be -1 (train for train.epochs) or >= 1, got 0"), std::string::npos)
      << r.out;
  std::string twice = d_.write("twice.json", "{\"base\": \"sft.json\",\n \"optim\": {\"lr\": 1e-5,\n   \"lr\": 2e-5}}\n");
  r = test::run(test::ptk_binary() + " sft --recipe " + twice + " run.dir=" + d_.file("run"));
  EXPECT_NE(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find(twice + ":3: duplicate key optim.lr (first on line 2)"), std::string::npos) << r.out;
  EXPECT_FALSE(path_exists(d_.file("run"))) << "the run started";
}

// model.dtype=bfloat16: bf16 parameters (AdamW keeps fp32 master weights), the loss falls, final/
// holds BF16 tensors. (That a bf16 run resumes exactly, fp32 master weights and moments restored, is
// sft_invariants_test's SftResume/bfloat16.)
TEST_F(SftCli, BFloat16ParametersTrainAndSave) {
  auto r = test::run(sft("model.dtype=bfloat16 optim.lr=1e-2 train.max_steps=8"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  auto lines = metric_lines();
  ASSERT_EQ(lines.size(), 8u);
  const double first = json::parse(lines.front(), "metrics")["loss"].GetDouble();
  const double last = json::parse(lines.back(), "metrics")["loss"].GetDouble();
  EXPECT_LT(last, first - 0.5) << "bf16 training did not lower the loss";
  // The safetensors header: u64 length, then JSON {name: {"dtype", ...}}.
  std::string bytes = read_file(d_.file("run/final/model.safetensors"));
  ASSERT_GT(bytes.size(), 8u);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  auto header = json::parse(bytes.substr(8, n), "model.safetensors header");
  int tensors = 0;
  for (auto it = header.MemberBegin(); it != header.MemberEnd(); ++it) {
    if (std::string(it->name.GetString()) == "__metadata__") continue;
    EXPECT_STREQ(it->value["dtype"].GetString(), "BF16") << it->name.GetString();
    ++tensors;
  }
  EXPECT_GT(tensors, 0);
}

TEST_F(SftCli, BadRecipeKeyIsReportedBeforeAnythingRuns) {
  auto r = test::run(sft("optim.lrr=1"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.out.find("unknown key optim.lrr (did you mean optim.lr?)"), std::string::npos) << r.out;
  EXPECT_FALSE(path_exists(d_.file("run/metrics.jsonl")));
}

TEST_F(SftCli, TwoRanksThroughLaunch) {
  auto r = test::run(test::ptk_binary() + " launch -n 2 -- " + sft("train.max_steps=2 checkpoint.every=0"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("[rank 1]"), std::string::npos) << r.out;
  EXPECT_EQ(metric_lines().size(), 2u);
  EXPECT_TRUE(path_exists(d_.file("run/final/model.safetensors")));
}

// sft.eval_prompts: held-out accuracy through ptk eval's code, before training (eval_start.json)
// and at every eval; with two ranks each scores half the prompts and the sums are all-reduced, so
// the figure logged at the last step equals `ptk eval` on final/.
TEST_F(SftCli, HeldoutAccuracyMatchesPtkEvalOnOneAndTwoRanks) {
  const std::string heldout = " sft.eval_prompts=" + d_.file("data/rl_eval.jsonl") + " sft.eval_max_new_tokens=12";
  for (int ranks : {1, 2}) {
    std::string run = d_.file("run" + std::to_string(ranks));
    std::string cmd = sft("train.max_steps=2 checkpoint.every=0 run.dir=" + run + heldout);
    if (ranks == 2) cmd = test::ptk_binary() + " launch -n 2 -- " + cmd;
    auto r = test::run(cmd);
    ASSERT_EQ(r.exit_code, 0) << r.out;
    EXPECT_NE(r.out.find("sft: before training, held-out accuracy"), std::string::npos) << r.out;
    auto start = json::parse(read_file(run + "/eval_start.json"), "eval_start.json");
    ASSERT_TRUE(start.HasMember("eval/accuracy"));
    std::istringstream in(read_file(run + "/metrics.jsonl"));
    std::string last;
    for (std::string l; std::getline(in, l);) last = l;
    auto m = json::parse(last, "metrics");
    ASSERT_TRUE(m.HasMember("eval/accuracy")) << last;
    ASSERT_TRUE(m.HasMember("eval/completions/mean_length")) << last;
    EXPECT_GT(m["eval/completions/mean_length"].GetDouble(), 0);
    auto e = test::run(test::ptk_binary() + " eval --threads 1 --model " + run + "/final --data " +
                       d_.file("data/rl_eval.jsonl") + " --max-new-tokens 12 --output " + run + "/eval.json");
    ASSERT_EQ(e.exit_code, 0) << e.out;
    auto ev = json::parse(read_file(run + "/eval.json"), "eval.json");
    EXPECT_NEAR(m["eval/accuracy"].GetDouble(), ev["accuracy"].GetDouble(), 1e-12) << "ranks " << ranks;
    EXPECT_NEAR(m["eval/completions/mean_length"].GetDouble(), ev["mean_length"].GetDouble(), 1e-9);
  }
}

// Runs `command` under bash with files limited to 64 KiB (ulimit -f), below the tiny model's 110 KB
// safetensors: crash = true lets SIGXFSZ kill it in the middle of that write (a crash mid-write),
// else the signal is ignored and the write fails with EFBIG, as on a full disk.
test::RunResult with_file_limit(const std::string& command, bool crash) {
  return test::run(std::string("bash -c \"") + (crash ? "" : "trap '' XFSZ; ") + "ulimit -f 64; exec " + command + "\"");
}

// Names in `dir` that start with `prefix`.
std::vector<std::string> names_starting(const std::string& dir, const std::string& prefix) {
  std::vector<std::string> out;
  if (!path_exists(dir)) return out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    std::string n = e.path().filename().string();
    if (n.rfind(prefix, 0) == 0) out.push_back(n);
  }
  return out;
}

// A checkpoint write that fails (full disk) removes its partial folders before the error ends the
// run, so the next run starts at once.
TEST_F(SftCli, FullDiskAtACheckpointLeavesNoPartialFolder) {
  auto r = with_file_limit(sft(""), false);
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("File too large"), std::string::npos) << r.out;
  const std::string tmp = d_.file("run/checkpoints/.tmp-step-2");
  EXPECT_NE(r.out.find("writing checkpoint step-2 failed; removed its partial output " + tmp + " ("), std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("failed; removed its partial output " + tmp + "/model.tmp.tmp-"), std::string::npos) << r.out;
  EXPECT_FALSE(path_exists(tmp));
  auto again = test::run(sft(""));
  ASSERT_EQ(again.exit_code, 0) << again.out;
  EXPECT_TRUE(path_exists(d_.file("run/final/model.safetensors")));
}

// A run killed while it writes a checkpoint or final/ leaves its temporary folder (.tmp-step-N has no
// pid in its name; final.tmp.tmp-<pid> has the dead one); the next start of the same run removes
// them, says so with their sizes, and finishes.
TEST_F(SftCli, KilledMidWriteLeavesTemporariesTheNextStartRemoves) {
  auto killed = with_file_limit(sft(""), true);
  EXPECT_NE(killed.exit_code, 0) << killed.out;
  const std::string step_tmp = d_.file("run/checkpoints/.tmp-step-2");
  ASSERT_TRUE(path_exists(step_tmp)) << killed.out;
  auto resumed = test::run(sft(""));
  ASSERT_EQ(resumed.exit_code, 0) << resumed.out;
  EXPECT_NE(resumed.out.find("removed leftover " + step_tmp + " ("), std::string::npos) << resumed.out;
  EXPECT_FALSE(path_exists(step_tmp));
  const std::string final_before = read_file(d_.file("run/final/model.safetensors"));

  // Two more steps, no checkpoints: killed while writing final/ (the old final/ stays whole).
  const std::string more = "train.max_steps=6 checkpoint.every=0";
  killed = with_file_limit(sft(more), true);
  EXPECT_NE(killed.exit_code, 0) << killed.out;
  auto left = names_starting(d_.file("run"), "final.tmp");
  ASSERT_EQ(left.size(), 1u) << killed.out;
  EXPECT_EQ(left[0].rfind("final.tmp.tmp-", 0), 0u) << left[0];
  EXPECT_EQ(read_file(d_.file("run/final/model.safetensors")), final_before);
  auto finished = test::run(sft(more));
  ASSERT_EQ(finished.exit_code, 0) << finished.out;
  EXPECT_NE(finished.out.find("removed leftover " + d_.file("run/" + left[0]) + " ("), std::string::npos) << finished.out;
  EXPECT_TRUE(names_starting(d_.file("run"), "final.tmp").empty());
  EXPECT_NE(read_file(d_.file("run/final/model.safetensors")), final_before);
}

// Two runs in one folder would overwrite each other's checkpoints: the second is refused, naming the
// process that holds the folder.
TEST_F(SftCli, ARunFolderInUseIsRefused) {
  RunFolderLock held(d_.file("run"));
  ASSERT_EQ(held.state(), RunFolderLock::State::kHeld);
  auto r = test::run(sft(""));
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("run folder " + d_.file("run") + " is in use by another ptk process (pid " +
                       std::to_string(::getpid()) + " on host "),
            std::string::npos)
      << r.out;
  EXPECT_FALSE(path_exists(d_.file("run/metrics.jsonl")));
  EXPECT_FALSE(path_exists(d_.file("run/data")));  // refused before preparing anything
}

TEST_F(SftCli, UnknownEvalVerifierIsARecipeError) {
  auto r = test::run(sft("sft.eval_verifier=maths"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.out.find("sft.eval_verifier"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace ptk
