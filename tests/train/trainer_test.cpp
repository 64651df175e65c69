// The shared step loop on a tiny Qwen2 (random init) with an SFT-shaped loss: the loss falls,
// micro-batch 1 x accumulation 8 equals micro-batch 8 x accumulation 1, a resumed run continues
// bit-for-bit (also from a checkpoint exactly at an epoch boundary), and the run folder has what
// docs/DESIGN.md promises; a checkpoint of the last step writes final/ without training.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <random>
#include <sstream>

#include "core/checkpoint/checkpoint.h"
#include "core/model/qwen2.h"
#include "core/train/checkpoint_dir.h"
#include "core/train/trainer.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_lm_stage.h"

namespace ptk::train {
namespace {

using test::TinyLmStage;

TrainerOptions options(const std::string& dir) {
  TrainerOptions o;
  o.run_dir = dir;
  o.resolved_recipe = "{}\n";
  o.lr = 3e-3;
  o.schedule = "cosine";
  o.warmup_steps = 2;
  o.adamw = optim::AdamWOptions{0.9, 0.95, 1e-8, 0.01, false};
  o.peak_flops = 1e10;
  o.label = "test";
  return o;
}

std::vector<double> losses(const std::string& run_dir) {
  std::vector<double> out;
  std::istringstream in(read_file(run_dir + "/metrics.jsonl"));
  std::string line;
  while (std::getline(in, line)) out.push_back(json::parse(line, "metrics")["loss"].GetDouble());
  return out;
}

TEST(Trainer, LossFallsAndRunFolderIsComplete) {
  at::set_num_threads(1);
  test::TempDir d;
  TinyLmStage stage(32, 4, 1);
  auto o = options(d.file("run"));
  o.epochs = 6;
  o.lr = 2e-2;
  o.checkpoint_every = 10;
  o.keep_last = 2;
  Trainer t(stage, o);
  EXPECT_EQ(t.total_steps(), 48);
  EXPECT_EQ(t.run(), 48);
  auto l = losses(o.run_dir);
  ASSERT_EQ(l.size(), 48u);
  EXPECT_LT(l.back(), 0.5 * l.front()) << "first " << l.front() << " last " << l.back();
  EXPECT_TRUE(path_exists(o.run_dir + "/config.json"));
  EXPECT_NE(read_file(o.run_dir + "/report.md").find("![loss](plots/loss.svg)"), std::string::npos);
  EXPECT_TRUE(path_exists(o.run_dir + "/plots/loss.svg"));
  EXPECT_TRUE(path_exists(o.run_dir + "/final/config.json"));
  EXPECT_TRUE(path_exists(o.run_dir + "/final/model.safetensors"));
  CheckpointDir c(o.run_dir + "/checkpoints", 2);
  auto all = c.complete();
  ASSERT_EQ(all.size(), 2u);  // steps 30 and 40 kept
  EXPECT_EQ(CheckpointDir::step_of(all[1]), 40);
  for (const char* f : {"config.json", "model.safetensors", "trainer_state/optimizer.safetensors",
                        "trainer_state/state.json", "trainer_state/rng.safetensors", "trainer_state/recipe.json"})
    EXPECT_TRUE(path_exists(all[1] + "/" + f)) << f;
  auto last = json::parse(read_file(o.run_dir + "/metrics.jsonl").substr(
                              read_file(o.run_dir + "/metrics.jsonl").rfind("{\"step\":48")),
                          "metrics");
  for (const char* k : {"loss", "lr", "learning_rate", "grad_norm", "tokens_per_s", "mfu", "step_time_s",
                        "peak_rss_bytes", "num_tokens", "mean_token_accuracy", "epoch"})
    EXPECT_TRUE(last.HasMember(k)) << k;
  EXPECT_DOUBLE_EQ(last["epoch"].GetDouble(), 6.0);
}

// TRL's invariant for SFT: the loss is normalized by the step's target count, so how the step's
// rows are split into micro-batches does not matter (padding differs; masked, it does not count).
TEST(Trainer, MicroBatch1Accum8EqualsMicroBatch8Accum1) {
  at::set_num_threads(1);
  test::TempDir d;
  TinyLmStage a(16, 1, 3), b(16, 8, 3);
  auto oa = options(d.file("a"));
  oa.grad_accum = 8;
  oa.max_steps = 2;
  auto ob = options(d.file("b"));
  ob.grad_accum = 1;
  ob.max_steps = 2;
  // Same rows in the same order: micro-batch size 8 consumes order[0..8) like 8 batches of 1.
  Trainer(a, oa).run();
  Trainer(b, ob).run();
  ASSERT_EQ(a.consumed, b.consumed);
  auto la = losses(oa.run_dir), lb = losses(ob.run_dir);
  for (size_t i = 0; i < la.size(); ++i) EXPECT_NEAR(la[i], lb[i], 1e-5) << "step " << i + 1;
  auto pa = a.parameters(), pb = b.parameters();
  double maxdiff = 0;
  for (size_t i = 0; i < pa.size(); ++i)
    maxdiff = std::max(maxdiff, (pa[i].second - pb[i].second).abs().max().item<double>());
  EXPECT_LT(maxdiff, 1e-5) << "max |param difference| " << maxdiff;
}

struct Crash : std::runtime_error {
  Crash() : std::runtime_error("simulated crash") {}
};

// Runs to `steps`, crashing when the stage is asked for micro-batch number `crash_at_batch`, then
// resumes with resume=auto; returns (losses, consumed order) of the stitched run.
void crash_and_resume(const std::string& dir, int64_t docs, int64_t mbs, int64_t accum, int64_t every,
                      int64_t crash_at_batch, std::vector<double>* l, std::vector<int64_t>* consumed) {
  auto o = options(dir);
  o.epochs = 3;
  o.grad_accum = accum;
  o.checkpoint_every = every;
  {
    TinyLmStage s(docs, mbs, 5, [&](int64_t n) {
      if (n * mbs == crash_at_batch) throw Crash();
    });
    EXPECT_THROW(Trainer(s, o).run(), Crash);
    consumed->assign(s.consumed.begin(), s.consumed.end());
  }
  TinyLmStage r(docs, mbs, 5);
  Trainer t(r, o);
  t.run();
  // The stitched order: what the crashed run consumed up to its checkpoint, then the resumed run.
  int64_t ckpt_step = (crash_at_batch / mbs - 1) / accum / every * every;
  consumed->resize(ckpt_step * accum * mbs);
  consumed->insert(consumed->end(), r.consumed.begin(), r.consumed.end());
  *l = losses(dir);
}

TEST(Trainer, ResumeIsBitForBit) {
  at::set_num_threads(1);
  test::TempDir d;
  auto o = options(d.file("ref"));
  o.epochs = 3;
  o.grad_accum = 2;
  TinyLmStage ref(20, 2, 5);
  Trainer(ref, o).run();  // 30 micro-batches, 15 steps
  auto lref = losses(o.run_dir);
  std::vector<double> l;
  std::vector<int64_t> consumed;
  // Checkpoints every 4 steps; crash in step 10 (micro-batch 19 of 2 rows -> row 38).
  crash_and_resume(d.file("crash"), 20, 2, 2, 4, 38, &l, &consumed);
  ASSERT_EQ(l.size(), lref.size());
  for (size_t i = 0; i < l.size(); ++i) EXPECT_EQ(l[i], lref[i]) << "step " << i + 1;
  EXPECT_EQ(consumed, ref.consumed);
  auto pr = ref.parameters();
  TinyLmStage final_model(20, 2, 5);
  load_weights_into(final_model.parameters(), d.file("crash") + "/final");
  auto pc = final_model.parameters();
  for (size_t i = 0; i < pr.size(); ++i) EXPECT_TRUE(torch::equal(pr[i].second, pc[i].second)) << pr[i].first;
}

TEST(Trainer, ResumeFromCheckpointAtEpochBoundary) {
  at::set_num_threads(1);
  test::TempDir d;
  // 16 docs, micro-batch 2, accumulation 2: 8 micro-batches = 4 steps per epoch; checkpoint every
  // 4 steps lands exactly on the epoch boundary; crash early in epoch 2.
  auto o = options(d.file("ref"));
  o.epochs = 3;
  o.grad_accum = 2;
  TinyLmStage ref(16, 2, 5);
  Trainer(ref, o).run();
  auto lref = losses(o.run_dir);
  std::vector<double> l;
  std::vector<int64_t> consumed;
  crash_and_resume(d.file("crash"), 16, 2, 2, 4, 22, &l, &consumed);
  ASSERT_EQ(l.size(), lref.size());
  for (size_t i = 0; i < l.size(); ++i) EXPECT_EQ(l[i], lref[i]) << "step " << i + 1;
  // Neither skipped nor repeated an epoch: each epoch consumed every document exactly once.
  ASSERT_EQ(consumed.size(), 48u);
  for (int e = 0; e < 3; ++e) {
    std::vector<int64_t> ep(consumed.begin() + e * 16, consumed.begin() + (e + 1) * 16);
    std::sort(ep.begin(), ep.end());
    for (int64_t i = 0; i < 16; ++i) EXPECT_EQ(ep[i], i) << "epoch " << e;
  }
}

}  // namespace
}  // namespace ptk::train

namespace ptk::train {
namespace {

// A model whose weights + gradients + AdamW state exceed the budget is refused up front.
// A stage whose model write fails part way, as on a full disk: some bytes written, then an error.
class FailingSaveStage : public TinyLmStage {
 public:
  using TinyLmStage::TinyLmStage;
  int fail_on_save = -1;  // which save_model call fails (0 = the first)
  void save_model(const std::string& dir) override {
    if (saves_++ == fail_on_save) {
      make_dirs(dir);
      write_file_atomic(dir + "/model.safetensors", std::string(100 << 10, 'x'));
      throw Error(dir + "/model.safetensors: write failed: No space left on device (disk full?)");
    }
    TinyLmStage::save_model(dir);
  }

 private:
  int saves_ = 0;
};

// A failed checkpoint or final/ write removes its partial folder (the space comes back at once and
// nothing is left for the next run to trip over); the error still ends the run.
TEST(Trainer, FailedWritesRemoveTheirPartialFolders) {
  at::set_num_threads(1);
  test::TempDir d;
  auto o = options(d.file("run"));
  o.max_steps = 4;
  o.checkpoint_every = 2;
  {
    FailingSaveStage stage(32, 4, 1);
    stage.fail_on_save = 0;  // the step-2 checkpoint
    Trainer t(stage, o);
    EXPECT_THROW(t.run(), Error);
  }
  EXPECT_FALSE(path_exists(o.run_dir + "/checkpoints/.tmp-step-2"));
  EXPECT_TRUE(CheckpointDir(o.run_dir + "/checkpoints", 1).complete().empty());
  {
    FailingSaveStage stage(32, 4, 1);
    stage.fail_on_save = 2;  // the checkpoints at steps 2 and 4 are written; final/ fails
    Trainer t(stage, o);
    EXPECT_THROW(t.run(), Error);
  }
  EXPECT_FALSE(path_exists(o.run_dir + "/final.tmp"));
  EXPECT_FALSE(path_exists(o.run_dir + "/final"));
  EXPECT_EQ(CheckpointDir(o.run_dir + "/checkpoints", 1).latest(), o.run_dir + "/checkpoints/step-4");
}

TEST(Trainer, RefusesAModelThatCannotFit) {
  test::TempDir d;
  TinyLmStage stage(8, 2, 1);
  auto o = options(d.file("run"));
  double need = training_state_bytes(stage.parameters(), 1, false);
  int64_t n = 0;
  for (auto& [name, p] : stage.parameters()) n += p.numel();
  EXPECT_DOUBLE_EQ(need, 16.0 * n);  // fp32: weights 4 + gradients 4 + two moments 8
  EXPECT_DOUBLE_EQ(training_state_bytes(stage.parameters(), 4, true), 8.0 * n + 8.0 * n / 4);
  o.memory_budget_bytes = need / 2;
  try {
    Trainer t(stage, o);
    FAIL() << "expected a refusal";
  } catch (const ptk::Error& e) {
    EXPECT_NE(std::string(e.what()).find("per rank (activations not counted)"), std::string::npos) << e.what();
  }
  o.memory_budget_bytes = need * 2;
  EXPECT_NO_THROW(Trainer(stage, o));
}

}  // namespace
}  // namespace ptk::train

namespace ptk::train {
namespace {

// issue 26: a run resumed from a checkpoint of its last step (final/ lost, e.g. a crash after the
// checkpoint) has nothing to train: no step, metrics.jsonl untouched, final/ written from that
// checkpoint's weights and finished.json (step N) beside it; a new run clears finished.json.
TEST(Trainer, CheckpointAtTheLastStepWritesFinalWithoutTraining) {
  at::set_num_threads(1);
  test::TempDir d;
  auto o = options(d.file("run"));
  o.max_steps = 4;
  o.checkpoint_every = 4;
  {
    TinyLmStage stage(32, 4, 1);
    Trainer t(stage, o);
    ASSERT_EQ(t.run(), 4);
  }
  EXPECT_EQ(json::parse_file(o.run_dir + "/finished.json")["step"].GetInt64(), 4);
  const std::string metrics = read_file(o.run_dir + "/metrics.jsonl");
  const std::string weights = read_file(o.run_dir + "/final/model.safetensors");
  std::filesystem::remove_all(o.run_dir + "/final");
  std::filesystem::remove(o.run_dir + "/finished.json");
  {
    TinyLmStage stage(32, 4, 1);
    Trainer t(stage, o);
    EXPECT_EQ(t.run(), 0);
    EXPECT_EQ(t.step(), 4);
  }
  EXPECT_EQ(read_file(o.run_dir + "/metrics.jsonl"), metrics);
  EXPECT_EQ(read_file(o.run_dir + "/final/model.safetensors"), weights) << "final/ is not the step-4 checkpoint's";
  EXPECT_EQ(json::parse_file(o.run_dir + "/finished.json")["step"].GetInt64(), 4);
  // A run that trains (here from step 0) removes finished.json until its own final/ is written.
  auto fresh = o;
  fresh.resume = "never";
  fresh.max_steps = 2;
  fresh.checkpoint_every = 0;
  TinyLmStage stage(32, 4, 1);
  Trainer t(stage, fresh);
  ASSERT_EQ(t.run(), 2);
  EXPECT_EQ(json::parse_file(o.run_dir + "/finished.json")["step"].GetInt64(), 2);
}

}  // namespace
}  // namespace ptk::train

namespace ptk::train {
namespace {

// TinyLmStage with its metrics handed over as device tensors (LossOut::tensor_metrics and
// tensor_ratios: no .item() in Stage::loss), and optionally a NaN loss on one micro-batch.
class TensorMetricsStage : public TinyLmStage {
 public:
  using TinyLmStage::TinyLmStage;
  int64_t nan_at = -1;  // this micro-batch (0-based, this stage's count) gets a NaN loss
  LossOut loss(const MicroBatch& mb, double n) override {
    auto& b = *static_cast<Batch*>(mb.data.get());
    model::ForwardInput in;
    in.input_ids = b.ids;
    in.attention_mask = b.mask;
    auto logits = model_.forward(in).logits;
    auto lp = torch::log_softmax(logits.slice(1, 0, -1), -1);
    auto tgt = b.labels.slice(1, 1);
    auto valid = tgt.ne(-100);
    auto nll = -lp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1);
    LossOut out;
    out.loss = (nll * valid).sum() / n;
    if (calls_++ == nan_at) out.loss = out.loss * std::nan("");
    out.tensor_ratios.push_back({"mean_token_accuracy", (lp.argmax(-1).eq(tgt) & valid).sum(), valid.sum()});
    out.tensor_metrics.emplace_back("rank_local_targets", at::scalar_tensor(static_cast<double>(mb.targets)));
    return out;
  }

 private:
  int64_t calls_ = 0;
};

// metrics.jsonl without the keys that time the run.
std::vector<std::string> untimed_metrics(const std::string& run_dir) {
  std::vector<std::string> out;
  std::istringstream in(read_file(run_dir + "/metrics.jsonl"));
  std::string line;
  while (std::getline(in, line)) {
    auto d = json::parse(line, "metrics");
    for (const char* k : {"tokens_per_s", "mfu", "step_time_s", "peak_rss_bytes"}) d.RemoveMember(k);
    out.push_back(json::to_string(d));
  }
  return out;
}

// The step loop reads the loss, the stage's tensor metrics and ratios and the gradient norm once per
// optimizer step; metrics.jsonl is the same, value for value, as when a stage reads its metrics with
// .item() per micro-batch (TinyLmStage), and so are the trained weights.
TEST(Trainer, TensorMetricsLogTheSameAsDoubles) {
  at::set_num_threads(1);
  test::TempDir d;
  auto oa = options(d.file("doubles")), ob = options(d.file("tensors"));
  for (auto* o : {&oa, &ob}) {
    o->epochs = 2;
    o->grad_accum = 3;
  }
  TinyLmStage a(24, 2, 7);
  TensorMetricsStage b(24, 2, 7);
  Trainer(a, oa).run();
  Trainer(b, ob).run();
  auto ma = untimed_metrics(oa.run_dir), mb = untimed_metrics(ob.run_dir);
  ASSERT_EQ(ma.size(), 8u);
  EXPECT_EQ(ma, mb);
  EXPECT_NE(ma.front().find("\"mean_token_accuracy\""), std::string::npos) << ma.front();
  auto pa = a.parameters(), pb = b.parameters();
  for (size_t i = 0; i < pa.size(); ++i) EXPECT_TRUE(torch::equal(pa[i].second, pb[i].second)) << pa[i].first;
}

// A micro-batch with a NaN loss makes the step's gradient norm NaN: the guard, deciding on the
// step's one read, skips that optimizer step (logged as skipped_step, grad_norm null) and the run
// goes on; the other steps update the weights.
TEST(Trainer, NanGuardSkipsTheBadStep) {
  at::set_num_threads(1);
  test::TempDir d;
  auto o = options(d.file("run"));
  o.max_steps = 4;
  o.grad_accum = 2;
  TensorMetricsStage stage(32, 2, 3);
  stage.nan_at = 3;  // step 2's second micro-batch
  Trainer t(stage, o);
  EXPECT_EQ(t.run(), 4);
  EXPECT_EQ(t.optimizer().steps(), 3);
  std::istringstream in(read_file(o.run_dir + "/metrics.jsonl"));
  std::string line;
  int step = 0;
  while (std::getline(in, line)) {
    ++step;
    auto m = json::parse(line, "metrics");
    EXPECT_EQ(m.HasMember("skipped_step"), step == 2) << line;
    EXPECT_EQ(m["grad_norm"].IsNull(), step == 2) << line;
  }
  EXPECT_EQ(step, 4);
  for (auto& [n, p] : stage.parameters()) EXPECT_TRUE(torch::isfinite(p).all().item<bool>()) << n;
}

// Checkpoints keep "torch_cpu" (and "torch_cuda" on a GPU) in rng.safetensors. A checkpoint whose
// rng.safetensors also holds a torch_cuda state (written on a GPU) resumes on the CPU bit for bit, as
// does one without it (written on the CPU or by an older ptk).
TEST(Trainer, ResumesWithAndWithoutCudaGeneratorState) {
  at::set_num_threads(1);
  test::TempDir d;
  auto o = options(d.file("run"));
  o.max_steps = 6;
  o.checkpoint_every = 3;
  std::vector<double> full;
  {
    TinyLmStage s(24, 2, 9);
    Trainer(s, o).run();
    full = losses(o.run_dir);
  }
  const std::string rng_file = o.run_dir + "/checkpoints/step-3/trainer_state/rng.safetensors";
  at::Tensor cpu_state;
  {
    auto saved = checkpoint::read_safetensors(rng_file);  // maps the file: copy before rewriting it
    ASSERT_EQ(saved.size(), 1u);
    ASSERT_TRUE(saved.count("torch_cpu"));
    cpu_state = saved.at("torch_cpu").clone();
  }
  for (bool with_cuda : {false, true}) {
    if (with_cuda) {
      // What a GPU run writes: the CUDA generator's 16 bytes (seed and offset) beside the CPU's.
      checkpoint::write_safetensors(rng_file, {{"torch_cpu", cpu_state},
                                               {"torch_cuda", at::zeros({16}, at::kByte)}});
    }
    std::filesystem::remove_all(o.run_dir + "/checkpoints/step-6");
    std::filesystem::remove_all(o.run_dir + "/final");
    TinyLmStage r(24, 2, 9);
    Trainer t(r, o);
    EXPECT_EQ(t.run(), 3) << "with torch_cuda: " << with_cuda;
    EXPECT_EQ(losses(o.run_dir), full) << "with torch_cuda: " << with_cuda;
  }
}

}  // namespace
}  // namespace ptk::train
