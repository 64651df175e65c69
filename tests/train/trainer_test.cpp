// The shared step loop on a tiny Qwen2 (random init) with an SFT-shaped loss: the loss falls,
// micro-batch 1 x accumulation 8 equals micro-batch 8 x accumulation 1, a resumed run continues
// bit-for-bit (also from a checkpoint exactly at an epoch boundary), and the run folder has what
// DESIGN.md promises.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <random>

#include "core/model/qwen2.h"
#include "core/train/checkpoint_dir.h"
#include "core/train/trainer.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "tests/support/test_util.h"

namespace ptk::train {
namespace {

checkpoint::Qwen2Config tiny_config() {
  checkpoint::Qwen2Config c;
  c.vocab_size = 48;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.max_position_embeddings = 64;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = true;
  c.eos_token_ids = {1};
  c.pad_token_id = 0;
  return c;
}

struct Batch {
  at::Tensor ids, mask, labels;  // (B, T)
};

// Documents with a learnable pattern (each token is the previous + 1 mod 40, from a random start);
// the first two tokens of every document are "prompt" (label -100).
class TinyLmStage : public Stage {
 public:
  TinyLmStage(int64_t docs, int64_t mbs, uint64_t seed, std::function<void(int64_t)> on_batch = nullptr)
      : mbs_(mbs), seed_(seed), on_batch_(std::move(on_batch)) {
    model_ = model::Qwen2Model::from_config(tiny_config(), seed);
    model_.set_requires_grad(true);
    std::mt19937_64 rng(seed + 99);
    for (int64_t d = 0; d < docs; ++d) {
      int64_t len = 5 + rng() % 12, start = rng() % 40;
      std::vector<int64_t> doc;
      for (int64_t t = 0; t < len; ++t) doc.push_back(2 + (start + t) % 40);
      docs_.push_back(doc);
    }
    shuffle();
  }
  optim::NamedTensors parameters() override { return model_.named_parameters(); }
  int64_t micro_batches_per_epoch() const override { return static_cast<int64_t>(docs_.size()) / mbs_; }
  MicroBatch next_micro_batch() override {
    if (index_ + mbs_ > static_cast<int64_t>(docs_.size())) {
      ++epoch_;
      index_ = 0;
      shuffle();
    }
    std::vector<const std::vector<int64_t>*> rows;
    for (int64_t i = 0; i < mbs_; ++i) {
      consumed.push_back(order_[index_ + i]);
      rows.push_back(&docs_[order_[index_ + i]]);
    }
    index_ += mbs_;
    if (on_batch_) on_batch_(static_cast<int64_t>(consumed.size()));
    int64_t T = 0;
    for (auto* r : rows) T = std::max<int64_t>(T, r->size());
    auto b = std::make_shared<Batch>();
    b->ids = torch::zeros({mbs_, T}, torch::kInt64);
    b->mask = torch::zeros({mbs_, T}, torch::kInt64);
    b->labels = torch::full({mbs_, T}, -100, torch::kInt64);
    int64_t targets = 0, tokens = 0;
    for (int64_t i = 0; i < mbs_; ++i) {
      for (size_t t = 0; t < rows[i]->size(); ++t) {
        b->ids[i][t] = (*rows[i])[t];
        b->mask[i][t] = 1;
        if (t >= 2) {
          b->labels[i][t] = (*rows[i])[t];
          ++targets;
        }
      }
      tokens += rows[i]->size();
    }
    return {b, targets, tokens};
  }
  std::string cursor_json() const override {
    return "{\"epoch\":" + std::to_string(epoch_) + ",\"index\":" + std::to_string(index_) + "}";
  }
  void restore_cursor(const std::string& j) override {
    auto d = json::parse(j, "cursor");
    epoch_ = d["epoch"].GetInt64();
    index_ = d["index"].GetInt64();
    shuffle();
  }
  LossOut loss(const MicroBatch& mb, double n) override {
    auto& b = *static_cast<Batch*>(mb.data.get());
    model::ForwardInput in;
    in.input_ids = b.ids;
    in.attention_mask = b.mask;
    auto logits = model_.forward(in).logits;  // (B, T, V)
    auto lp = torch::log_softmax(logits.slice(1, 0, -1), -1);
    auto tgt = b.labels.slice(1, 1);
    auto valid = tgt.ne(-100);
    auto nll = -lp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1);
    LossOut out;
    out.loss = (nll * valid).sum() / n;
    auto acc = (lp.argmax(-1).eq(tgt) & valid).sum().item<double>() / valid.sum().item<double>();
    out.metrics.add("mean_token_accuracy", acc);
    return out;
  }
  void save_model(const std::string& dir) override { model_.save_pretrained(dir); }
  double flops_per_token() const override { return 6.0 * 20000; }

  model::Qwen2Model model_;
  std::vector<int64_t> consumed;

 private:
  void shuffle() {
    order_.resize(docs_.size());
    for (size_t i = 0; i < order_.size(); ++i) order_[i] = static_cast<int64_t>(i);
    std::mt19937_64 rng(seed_ * 1000003 + epoch_);
    std::shuffle(order_.begin(), order_.end(), rng);
  }
  std::vector<std::vector<int64_t>> docs_;
  std::vector<int64_t> order_;
  int64_t mbs_, epoch_ = 0, index_ = 0;
  uint64_t seed_;
  std::function<void(int64_t)> on_batch_;
};

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
      if (n == crash_at_batch) throw Crash();
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
