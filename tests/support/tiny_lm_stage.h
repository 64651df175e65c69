// A tiny Qwen2 (random init) with an SFT-shaped loss, the Stage the trainer and data-parallel tests
// drive. Documents have a learnable pattern (each token is the previous + 1 mod 40, from a random
// start); the first two tokens of every document are "prompt" (label -100). With set_rank(), each
// global batch of micro_batch * world_size rows (one shuffled order shared by all ranks) is cut into
// contiguous per-rank parts, so 2 ranks with micro-batch b see exactly the rows 1 rank with
// micro-batch 2b sees. Test code only.
#pragma once
#include <torch/torch.h>

#include <algorithm>
#include <csignal>
#include <functional>
#include <random>

#include "core/model/qwen2.h"
#include "core/train/trainer.h"
#include "core/util/json.h"
#include "tests/support/tiny_qwen2.h"

namespace ptk::test {

inline checkpoint::Qwen2Config tiny_lm_config() {
  auto c = tiny_qwen2_config(48, 64);
  c.eos_token_ids = {1};
  c.pad_token_id = 0;
  return c;
}

class TinyLmStage : public train::Stage {
 public:
  struct Batch {
    at::Tensor ids, mask, labels;  // (B, T)
  };
  // `on_batch(n)` is called with the number of micro-batches this rank has consumed.
  TinyLmStage(int64_t docs, int64_t mbs, uint64_t seed, std::function<void(int64_t)> on_batch = nullptr)
      : mbs_(mbs), seed_(seed), on_batch_(std::move(on_batch)) {
    model_ = model::Qwen2Model::from_config(tiny_lm_config(), seed);
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
  void set_rank(int rank, int world) override {
    rank_ = rank;
    world_ = world;
  }
  optim::NamedTensors parameters() override { return model_.named_parameters(); }
  int64_t micro_batches_per_epoch() const override {
    return static_cast<int64_t>(docs_.size()) / (mbs_ * world_);
  }
  train::MicroBatch next_micro_batch() override {
    const int64_t global = mbs_ * world_;
    if (index_ + global > static_cast<int64_t>(docs_.size())) {
      ++epoch_;
      index_ = 0;
      shuffle();
    }
    std::vector<const std::vector<int64_t>*> rows;
    for (int64_t i = 0; i < mbs_; ++i) {
      consumed.push_back(order_[index_ + rank_ * mbs_ + i]);
      rows.push_back(&docs_[consumed.back()]);
    }
    index_ += global;
    ++consumed_;
    if (on_batch_) on_batch_(consumed_);
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
  train::LossOut loss(const train::MicroBatch& mb, double n) override {
    auto& b = *static_cast<Batch*>(mb.data.get());
    model::ForwardInput in;
    in.input_ids = b.ids;
    in.attention_mask = b.mask;
    auto logits = model_.forward(in).logits;  // (B, T, V)
    auto lp = torch::log_softmax(logits.slice(1, 0, -1), -1);
    auto tgt = b.labels.slice(1, 1);
    auto valid = tgt.ne(-100);
    auto nll = -lp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1);
    train::LossOut out;
    out.loss = (nll * valid).sum() / n;
    double correct = (lp.argmax(-1).eq(tgt) & valid).sum().item<double>();
    out.ratios.push_back({"mean_token_accuracy", correct, valid.sum().item<double>()});
    out.metrics.add("rank_local_targets", static_cast<double>(mb.targets));
    return out;
  }
  void save_model(const std::string& dir) override { model_.save_pretrained(dir); }
  double flops_per_token() const override { return 6.0 * 20000; }

  model::Qwen2Model model_;
  std::vector<int64_t> consumed;  // document indices this rank consumed, in order

 private:
  void shuffle() {
    order_.resize(docs_.size());
    for (size_t i = 0; i < order_.size(); ++i) order_[i] = static_cast<int64_t>(i);
    std::mt19937_64 rng(seed_ * 1000003 + epoch_);
    std::shuffle(order_.begin(), order_.end(), rng);
  }
  std::vector<std::vector<int64_t>> docs_;
  std::vector<int64_t> order_;
  int64_t mbs_, epoch_ = 0, index_ = 0, consumed_ = 0;
  int rank_ = 0, world_ = 1;
  uint64_t seed_;
  std::function<void(int64_t)> on_batch_;
};

}  // namespace ptk::test
