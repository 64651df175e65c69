// `ptk pipeline` and `ptk sweep` end to end on a tiny random model (make-data's byte tokenizer):
// SFT -> SFT chaining through final/, skip on rerun, resume after the stage is stopped mid-run, a
// failing stage reported with its output; leftovers of crashed writes in a done or changed stage's
// folder removed; a 2x2 SFT sweep's table, CSV and SVG, resumed after an interruption; recipe
// errors in pipeline and sweep files named with file and key.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

#include "core/util/fs.h"
#include "core/util/json.h"
#include "tests/support/test_util.h"
#include "tests/support/text.h"

namespace ptk {
namespace {

const char* kModel = R"({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 259,
  "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
  "num_key_value_heads": 2, "max_position_embeddings": 128, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
  "hidden_act": "silu", "initializer_range": 0.02, "tie_word_embeddings": true, "use_sliding_window": false,
  "eos_token_id": 258, "pad_token_id": 256})";

using test::count;

size_t lines_of(const std::string& path) {
  std::istringstream in(read_file(path));
  size_t n = 0;
  for (std::string l; std::getline(in, l);) n += !l.empty();
  return n;
}

// A command started in the background (own process group), output to a file.
struct Background {
  pid_t pid = -1;
  std::string log;
  Background(const std::string& command, const std::string& log_path) : log(log_path) {
    pid = ::fork();
    if (pid == 0) {
      ::setpgid(0, 0);
      execl("/bin/sh", "sh", "-c", ("exec " + command + " > " + log_path + " 2>&1").c_str(), nullptr);
      ::_exit(127);
    }
  }
  // Waits until `path` exists (true) or the command ended / `seconds` passed (false).
  bool wait_path(const std::string& path, double seconds) {
    auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
    while (std::chrono::steady_clock::now() < end) {
      if (path_exists(path)) return true;
      int st;
      if (::waitpid(pid, &st, WNOHANG) == pid) {
        pid = -1;
        return path_exists(path);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }
  int stop(int sig) {  // signal to the command only (it forwards to its children), then wait
    if (pid < 0) return -1;
    ::kill(pid, sig);
    int st = 0;
    ::waitpid(pid, &st, 0);
    pid = -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  }
  ~Background() {
    if (pid > 0) {
      ::kill(-pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
};

class PipelineCli : public ::testing::Test {
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
    eval_built_ = test::run(test::ptk_binary() + " eval --help").exit_code == 0;
  }
  std::string eval_block() {
    return "\"eval\": {\"data\": \"" + d_.file("data/rl_eval.jsonl") + "\", \"verifier\": \"math\", "
           "\"max_new_tokens\": 8, \"limit\": 4},\n";
  }
  // Two SFT stages: a (random init) -> b (from a's final/), b's steps given.
  std::string two_stage(int b_steps, const std::string& b_extra = "") {
    return d_.write("pipe.json", "// two SFT stages\n{\"run\": {\"dir\": \"" + d_.file("pipe") + "\"},\n" + eval_block() +
                                     " \"stages\": [\n"
                                     "  {\"name\": \"a\", \"command\": \"sft\", \"recipe\": \"sft.json\"},\n"
                                     "  {\"name\": \"b\", \"command\": \"sft\", \"recipe\": \"sft.json\",\n"
                                     "   \"overrides\": {\"train.max_steps\": " + std::to_string(b_steps) +
                                     ", \"optim.lr\": 5e-4" + b_extra + "}},\n ]}\n");
  }
  std::string pipeline(const std::string& file) {
    return test::ptk_binary() + " pipeline --threads 1 --recipe " + file;
  }
  test::TempDir d_;
  bool eval_built_ = false;
};

TEST_F(PipelineCli, SftToSftChainsFinalAndSkipsOnRerun) {
  auto r = test::run(pipeline(two_stage(4)));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  for (const char* s : {"a", "b"}) {
    EXPECT_TRUE(path_exists(d_.file("pipe/") + s + "/final/model.safetensors")) << s;
    EXPECT_EQ(lines_of(d_.file("pipe/") + s + "/metrics.jsonl"), 4u) << s;
  }
  // b started from a's final/ (its resolved recipe says so) and not from a random init.
  auto cfg = json::parse_file(d_.file("pipe/b/config.json"), json::Syntax::kRelaxed);
  EXPECT_EQ(std::string(cfg["model"]["path"].GetString()), d_.file("pipe") + "/a/final");
  EXPECT_EQ(std::string(cfg["model"]["config"].GetString()), "");
  auto cfg_a = json::parse_file(d_.file("pipe/a/config.json"), json::Syntax::kRelaxed);
  EXPECT_EQ(std::string(cfg_a["model"]["path"].GetString()), "");
  EXPECT_NE(r.out.find("held-out accuracy after a: "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("held-out accuracy after b: "), std::string::npos) << r.out;
  if (eval_built_) {
    EXPECT_TRUE(path_exists(d_.file("pipe/b/heldout_eval.json")));
  }
  EXPECT_NE(r.out.find("| a | sft | ran |"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| b | sft | ran |"), std::string::npos) << r.out;
  EXPECT_TRUE(path_exists(d_.file("pipe/summary.md")));

  // Rerun: both stages are complete for their recipes -> skipped, nothing retrained.
  std::string metrics_b = read_file(d_.file("pipe/b/metrics.jsonl"));
  auto again = test::run(pipeline(d_.file("pipe.json")));
  ASSERT_EQ(again.exit_code, 0) << again.out;
  EXPECT_EQ(count(again.out, "is complete for this recipe; skipping"), 2u) << again.out;
  EXPECT_NE(again.out.find("| b | sft | skipped (done) |"), std::string::npos) << again.out;
  EXPECT_EQ(read_file(d_.file("pipe/b/metrics.jsonl")), metrics_b);
  EXPECT_EQ(again.out.find("[b] "), std::string::npos) << "stage b ran again:\n" << again.out;

  // Changing b's recipe reruns b only, from scratch.
  two_stage(4, ", \"optim.warmup_steps\": 2");
  auto changed = test::run(pipeline(d_.file("pipe.json")));
  ASSERT_EQ(changed.exit_code, 0) << changed.out;
  EXPECT_NE(changed.out.find("| a | sft | skipped (done) |"), std::string::npos) << changed.out;
  EXPECT_NE(changed.out.find("stage b: " + d_.file("pipe/b") + " held a run of a different recipe or input; moved it to " +
                            d_.file("pipe/b.old-1")), std::string::npos)
      << changed.out;
  EXPECT_TRUE(path_exists(d_.file("pipe/b.old-1/final/model.safetensors")));
  EXPECT_EQ(lines_of(d_.file("pipe/b/metrics.jsonl")), 4u);
}

// "model_from": "a@step-2" starts a stage from a's checkpoints/step-2 (an HF folder a kept), not its
// final/; a checkpoint a did not keep stops the pipeline with the path and why; a malformed one is
// a recipe error.
TEST_F(PipelineCli, StageStartsFromAnEarlierStagesCheckpoint) {
  auto write = [&](const std::string& from) {
    return d_.write("ck.json", "{\"run\": {\"dir\": \"" + d_.file("pipe") + "\"},\n" + eval_block() +
                                   " \"stages\": [\n"
                                   "  {\"name\": \"a\", \"command\": \"sft\", \"recipe\": \"sft.json\",\n"
                                   "   \"overrides\": {\"train.max_steps\": 4, \"checkpoint.every\": 2, \"checkpoint.keep_last\": 2}},\n"
                                   "  {\"name\": \"b\", \"command\": \"sft\", \"recipe\": \"sft.json\", \"model_from\": \"" + from + "\",\n"
                                   "   \"overrides\": {\"train.max_steps\": 2}}]}\n");
  };
  auto r = test::run(pipeline(write("a@step-2")));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  auto cfg = json::parse_file(d_.file("pipe/b/config.json"), json::Syntax::kRelaxed);
  EXPECT_EQ(std::string(cfg["model"]["path"].GetString()), d_.file("pipe") + "/a/checkpoints/step-2");

  auto missing = test::run(pipeline(write("a@step-3")));
  EXPECT_EQ(missing.exit_code, 1) << missing.out;
  EXPECT_NE(missing.out.find("stage `b` starts from " + d_.file("pipe") + "/a/checkpoints/step-3, which does not exist"),
            std::string::npos) << missing.out;
  EXPECT_NE(missing.out.find("checkpoint.keep_last"), std::string::npos) << missing.out;

  std::string bad = write("a@latest");
  auto e = test::run(pipeline(bad));
  EXPECT_EQ(e.exit_code, 1) << e.out;
  EXPECT_NE(e.out.find(bad + ": stages[1].model_from: `a@latest`: after '@' give a checkpoint of that stage, step-N"),
            std::string::npos) << e.out;
}

TEST_F(PipelineCli, StoppedStageResumesFromItsCheckpoint) {
  // b runs long enough to be stopped after its first checkpoint.
  std::string file = two_stage(600, ", \"checkpoint.every\": 10");
  {
    Background bg(pipeline(file), d_.file("first.log"));
    ASSERT_TRUE(bg.wait_path(d_.file("pipe/b/checkpoints/latest"), 240)) << read_file(d_.file("first.log"));
    ASSERT_FALSE(path_exists(d_.file("pipe/b/final"))) << "b finished before it could be stopped";
    int code = bg.stop(SIGTERM);
    std::string log = read_file(d_.file("first.log"));
    EXPECT_EQ(code, 128 + SIGTERM) << log;
    EXPECT_NE(log.find("forwarding it to the running stages"), std::string::npos) << log;
    EXPECT_NE(log.find("| b | sft | interrupted |"), std::string::npos) << log;
  }
  // The same command again: a is skipped, b continues from its checkpoint (the stage's own
  // resume=auto), not from step 0.
  auto r = test::run(pipeline(file));
  ASSERT_EQ(r.exit_code, 0) << r.out.substr(r.out.size() > 4000 ? r.out.size() - 4000 : 0);
  EXPECT_NE(r.out.find("| a | sft | skipped (done) |"), std::string::npos);
  EXPECT_NE(r.out.find("an unfinished run is in"), std::string::npos);
  EXPECT_NE(r.out.find("resumed from"), std::string::npos) << "stage b started over";
  EXPECT_NE(r.out.find("| b | sft | resumed |"), std::string::npos);
  EXPECT_TRUE(path_exists(d_.file("pipe/b/final/model.safetensors")));
  EXPECT_EQ(lines_of(d_.file("pipe/b/metrics.jsonl")), 600u);
}

// Leftovers of a crashed run of a stage (a partial final/ or checkpoint) in a stage folder the
// pipeline does not run again: removed, with a line each, when the stage is skipped as done and
// before a changed stage's folder is moved aside. (A stage that runs removes its own at start.)
TEST_F(PipelineCli, LeftoverTemporariesOfADoneOrChangedStageAreRemoved) {
  auto write = [&](const std::string& extra) {
    return d_.write("one.json", "{\"run\": {\"dir\": \"" + d_.file("pipe") + "\"},\n \"stages\": [\n"
                                "  {\"name\": \"a\", \"command\": \"sft\", \"recipe\": \"sft.json\",\n"
                                "   \"overrides\": {\"train.max_steps\": 2" + extra + "}}]}\n");
  };
  std::string file = write("");
  auto r = test::run(pipeline(file));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  pid_t child = ::fork();  // a pid that is dead by the time the pipeline looks
  if (child == 0) ::_exit(0);
  ::waitpid(child, nullptr, 0);
  const std::string a = d_.file("pipe/a");
  const std::string partial_final = a + "/final.tmp.tmp-" + std::to_string(child);
  make_dirs(partial_final);
  write_file_atomic(partial_final + "/model.safetensors", std::string(3000, 'x'));
  make_dirs(a + "/checkpoints/.tmp-step-7");
  auto again = test::run(pipeline(file));
  ASSERT_EQ(again.exit_code, 0) << again.out;
  EXPECT_NE(again.out.find("| a | sft | skipped (done) |"), std::string::npos) << again.out;
  EXPECT_NE(again.out.find("stage a: removed leftover " + partial_final + " (2.93 KiB)"), std::string::npos) << again.out;
  EXPECT_NE(again.out.find("stage a: removed leftover " + a + "/checkpoints/.tmp-step-7 (0 B)"), std::string::npos)
      << again.out;
  EXPECT_FALSE(path_exists(partial_final));
  EXPECT_FALSE(path_exists(a + "/checkpoints/.tmp-step-7"));
  EXPECT_TRUE(path_exists(a + "/final/model.safetensors"));

  make_dirs(a + "/final.tmp");
  auto changed = test::run(pipeline(write(", \"optim.lr\": 5e-4")));
  ASSERT_EQ(changed.exit_code, 0) << changed.out;
  EXPECT_NE(changed.out.find("stage a: removed leftover " + a + "/final.tmp (0 B)"), std::string::npos) << changed.out;
  EXPECT_TRUE(path_exists(d_.file("pipe/a.old-1/final/model.safetensors")));
  EXPECT_FALSE(path_exists(d_.file("pipe/a.old-1/final.tmp")));
}

TEST_F(PipelineCli, FailingStageIsReportedAndEarlierStagesKept) {
  std::string file = two_stage(4, ", \"optim.lrr\": 1");
  auto r = test::run(pipeline(file));
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("pipeline: stage `b` failed"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("unknown key optim.lrr (did you mean optim.lr?)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| b | sft | failed |"), std::string::npos) << r.out;
  EXPECT_TRUE(path_exists(d_.file("pipe/a/final/model.safetensors")));
  // Fixed: a is skipped, b runs.
  two_stage(4);
  auto fixed = test::run(pipeline(file));
  ASSERT_EQ(fixed.exit_code, 0) << fixed.out;
  EXPECT_NE(fixed.out.find("| a | sft | skipped (done) |"), std::string::npos) << fixed.out;
}

TEST_F(PipelineCli, RecipeErrorsNameFileAndKey) {
  std::string file = d_.write("bad.json", "{\"stages\": [{\"command\": \"sfx\", \"recipie\": \"sft.json\"},\n"
                                          " {\"command\": \"sft\", \"recipe\": \"nope.json\", \"model_from\": \"zz\"}],\n"
                                          " \"evals\": {}}");
  auto r = test::run(pipeline(file));
  EXPECT_EQ(r.exit_code, 1) << r.out;
  for (std::string want : {file + ": unknown key stages[0].recipie (did you mean stages[0].recipe?)",
                           file + ": stages[0].command: `sfx` is not one of sft, dpo, rm, grpo (did you mean `sft`?)",
                           file + ": stages[0].recipe: missing", file + ": stages[1].recipe: `nope.json` resolves to",
                           file + ": stages[1].model_from: `zz` is not an earlier stage's name",
                           file + ": unknown key evals (did you mean eval?)"})
    EXPECT_NE(r.out.find(want), std::string::npos) << "want: " << want << "\n" << r.out;
  EXPECT_FALSE(path_exists(d_.file("runs")));

  std::string sweep = d_.write("bad_sweep.json", "{\"command\": \"sft\", \"recipe\": \"sft.json\",\n"
                                                 " \"grid\": {\"optim.lr\": 0.001}, \"paralel\": 2}");
  auto s = test::run(test::ptk_binary() + " sweep --recipe " + sweep);
  EXPECT_EQ(s.exit_code, 1) << s.out;
  EXPECT_NE(s.out.find(sweep + ": grid.optim.lr: must be a non-empty list of values"), std::string::npos) << s.out;
  EXPECT_NE(s.out.find(sweep + ": unknown key paralel (did you mean parallel?)"), std::string::npos) << s.out;
}

class SweepCli : public PipelineCli {
 protected:
  std::string sweep_file(int steps) {
    return d_.write("sweep.json", "{\"command\": \"sft\", \"recipe\": \"sft.json\",\n"
                                  " \"run\": {\"dir\": \"" + d_.file("sweep") + "\"},\n" + eval_block() +
                                  " \"overrides\": {\"train.max_steps\": " + std::to_string(steps) + "},\n"
                                  " \"grid\": {\"optim.lr\": [0.001, 0.002], \"optim.warmup_steps\": [0, 1]}}");
  }
  std::string sweep(const std::string& file, const std::string& extra = "") {
    return test::ptk_binary() + " sweep --threads 1 --recipe " + file + " " + extra;
  }
};

TEST_F(SweepCli, TwoByTwoWritesTableCsvAndCurves) {
  auto r = test::run(sweep(sweep_file(4), "--parallel 2"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  for (const char* run : {"lr=0.001,warmup_steps=0", "lr=0.001,warmup_steps=1", "lr=0.002,warmup_steps=0",
                          "lr=0.002,warmup_steps=1"})
    EXPECT_TRUE(path_exists(d_.file("sweep/") + run + "/final/model.safetensors")) << run << "\n" << r.out;
  std::string csv = read_file(d_.file("sweep/sweep.csv"));
  EXPECT_EQ(csv.rfind("run,optim.lr,optim.warmup_steps,status,seconds,step,loss,eval/loss,eval/mean_token_accuracy,"
                      "held-out accuracy (math)\n", 0), 0u) << csv;
  EXPECT_EQ(count(csv, "\n"), 5u) << csv;
  EXPECT_NE(csv.find("lr=0.002,warmup_steps=1\",0.002,1,ran,"), std::string::npos) << csv;
  std::string md = read_file(d_.file("sweep/sweep.md"));
  EXPECT_NE(md.find("| run | optim.lr | optim.warmup_steps | status |"), std::string::npos) << md;
  EXPECT_NE(md.find("![loss](plots/loss.svg)"), std::string::npos) << md;
  std::string svg = read_file(d_.file("sweep/plots/loss.svg"));
  EXPECT_EQ(count(svg, "class=\"series\""), 4u);
  EXPECT_TRUE(path_exists(d_.file("sweep/plots/eval_loss.svg")));
  if (eval_built_) {
    EXPECT_EQ(count(csv, ",ran,"), 4u);
  }

  // Rerun: all four are done.
  auto again = test::run(sweep(d_.file("sweep.json")));
  ASSERT_EQ(again.exit_code, 0) << again.out;
  EXPECT_EQ(count(again.out, "done (skipped)"), 4u) << again.out;
  EXPECT_EQ(count(read_file(d_.file("sweep/sweep.csv")), ",skipped (done),"), 4u);
}

TEST_F(SweepCli, InterruptedSweepResumesWhereItStopped) {
  std::string file = sweep_file(300);
  {
    Background bg(sweep(file, "--parallel 1") + " overrides.checkpoint.every=10", d_.file("first.log"));
    // Stop once the second run has its first checkpoint (the first run is then finished).
    ASSERT_TRUE(bg.wait_path(d_.file("sweep/lr=0.001,warmup_steps=1/checkpoints/latest"), 400))
        << read_file(d_.file("first.log"));
    int code = bg.stop(SIGINT);
    std::string log = read_file(d_.file("first.log"));
    EXPECT_EQ(code, 128 + SIGINT) << log;
    EXPECT_NE(log.find("interrupted"), std::string::npos) << log;
  }
  EXPECT_TRUE(path_exists(d_.file("sweep/lr=0.001,warmup_steps=0/final/model.safetensors")));
  auto dry = test::run(sweep(file, "--dry-run overrides.checkpoint.every=10"));
  EXPECT_NE(dry.out.find("lr=0.001,warmup_steps=0                  done (skipped)"), std::string::npos) << dry.out;
  EXPECT_NE(dry.out.find("lr=0.001,warmup_steps=1                  resume"), std::string::npos) << dry.out;
  EXPECT_NE(dry.out.find("lr=0.002,warmup_steps=0                  new"), std::string::npos) << dry.out;
}

}  // namespace
}  // namespace ptk
