// The reward-model stage on core/train's loop (see rm_stage.h). Not the loss (rm_loss.cpp).
#include "reward/rm_stage.h"

#include <torch/torch.h>

#include <cmath>
#include <fstream>
#include <map>

#include "core/parallel/comm.h"
#include "core/model/qwen2.h"
#include "core/runtime/log.h"
#include "core/tokenizer/tokenizer.h"
#include "core/train/from_recipe.h"
#include "core/train/stage_setup.h"
#include "core/train/trainer.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "datasets/loader.h"
#include "datasets/prepare.h"
#include "reward/rm_loss.h"

namespace ptk::reward {

void RmSection::visit(config::Visitor& v) {
  v.opt(center_rewards_coefficient, "center_rewards_coefficient", 0.0,
        "weight of mean((r+ + r-)^2), keeping scores near 0 (TRL's option; 0 = off, TRL recommends 0.01)");
  v.opt(margin_column, "margin_column", "margin",
        "per-pair margin m read from this field of each JSONL record when present (loss -logsig(r+ - r- - m)); "
        "\"\" ignores it");
  v.opt(eval_micro_batch_size, "eval_micro_batch_size", 16, "pairs per forward for eval on data.eval");
}

void RmSection::validate(config::Errors& e) const {
  if (center_rewards_coefficient < 0 || !std::isfinite(center_rewards_coefficient))
    e.add("rm.center_rewards_coefficient must be >= 0 (got " + std::to_string(center_rewards_coefficient) + ")");
  if (eval_micro_batch_size < 1) e.add("rm.eval_micro_batch_size must be >= 1");
}

std::pair<at::Tensor, at::Tensor> pad_rows(const std::vector<std::vector<int64_t>>& rows, int64_t pad_id) {
  const int64_t R = static_cast<int64_t>(rows.size());
  int64_t T = 1;
  for (const auto& r : rows) T = std::max<int64_t>(T, static_cast<int64_t>(r.size()));
  at::Tensor ids = torch::full({R, T}, pad_id, torch::kInt64);  // (R, T)
  at::Tensor lens = torch::empty({R}, torch::kInt64);           // (R)
  auto a = ids.accessor<int64_t, 2>();
  auto l = lens.accessor<int64_t, 1>();
  for (int64_t i = 0; i < R; ++i) {
    for (size_t t = 0; t < rows[i].size(); ++t) a[i][static_cast<int64_t>(t)] = rows[i][t];
    l[i] = static_cast<int64_t>(rows[i].size());
  }
  return {ids, lens};
}

at::Tensor score_rows(const model::Qwen2Model& model, const at::Tensor& ids, const at::Tensor& lengths,
                      std::optional<int64_t> pad_id, bool checkpointed,
                      const std::vector<std::pair<int64_t, int64_t>>& row_spans) {
  const int64_t T = ids.size(1);
  at::Tensor pos = torch::arange(T, ids.options().dtype(torch::kInt64)).unsqueeze(0);  // (1, T)
  model::ForwardInput in;
  in.input_ids = ids;
  in.attention_mask = pos.lt(lengths.to(ids.device()).unsqueeze(1)).to(torch::kInt64);  // (R, T)
  in.row_spans = row_spans;
  model::ForwardOptions fo;
  fo.logits = false;
  fo.activation_checkpointing = checkpointed;
  auto out = model.forward(in, fo);
  // transformers' Qwen2ForSequenceClassification pooling: the rightmost non-pad token (with
  // pad == eos, the token before an appended EOS). Scores in fp32 whatever the weights' dtype (as the
  // lm_head op's logits): with bf16 weights (model.dtype=auto on a GPU) the loss, margins and the
  // differences between close rewards would otherwise round to ~|r| 2^-8.
  return model.score(out.hidden, model::score_index(ids, in.attention_mask, pad_id)).to(at::kFloat);  // (R)
}

namespace {

struct Batch {
  at::Tensor ids, lengths;  // (2P, T), (2P): P chosen rows then P rejected rows, on the model's device
  at::Tensor margin;        // (P) or undefined
  int64_t pairs = 0;
  std::vector<int64_t> host_lengths;                   // (2P) the lengths, host-side
  std::vector<std::pair<int64_t, int64_t>> row_spans;  // (2P) {0, length}: ForwardInput::row_spans
};

// (source, line) -> margin for the records that carry the margin column.
using MarginMap = std::map<std::pair<uint32_t, uint32_t>, double>;

MarginMap read_margins(const data::PreparedSet& set, const std::string& column) {
  MarginMap out;
  if (column.empty()) return out;
  auto manifest = json::parse(set.manifest(), set.dir() + "/manifest.json");
  const auto& sources = manifest["key"]["sources"];
  const std::string needle = "\"" + column + "\"";
  for (rapidjson::SizeType s = 0; s < sources.Size(); ++s) {
    std::string path = sources[s]["path"].GetString();
    check_regular_file(path);  // before the open: a FIFO put in its place would block it forever
    std::ifstream f(path);
    if (!f) throw Error("rm: cannot reopen " + path + " to read its `" + column + "` column (the prepared data names it)");
    std::string line;
    for (uint32_t n = 1; std::getline(f, line); ++n) {
      if (line.find(needle) == std::string::npos) continue;
      auto d = json::parse(line, path + ":" + std::to_string(n));
      if (!d.IsObject() || !d.HasMember(column.c_str())) continue;
      const auto& m = d[column.c_str()];
      if (!m.IsNumber())
        throw Error(path + ":" + std::to_string(n) + ": `" + column + "` is " + json::type_name(m) +
                    ", not a number\n---> HINT: set rm.margin_column=\"\" to ignore the column");
      out[{s, n}] = m.GetDouble();
    }
  }
  return out;
}

std::shared_ptr<Batch> make_batch(const std::vector<data::PairView>& pairs, int64_t pad_id, const MarginMap& margins,
                                  const at::Device& device) {
  auto b = std::make_shared<Batch>();
  b->pairs = static_cast<int64_t>(pairs.size());
  std::vector<std::vector<int64_t>> rows;
  for (int k = 0; k < 2; ++k) {
    for (const auto& p : pairs) {
      std::vector<int64_t> r(p.prompt.begin(), p.prompt.end());
      const auto& reply = k == 0 ? p.chosen : p.rejected;
      r.insert(r.end(), reply.begin(), reply.end());
      rows.push_back(std::move(r));
    }
  }
  std::tie(b->ids, b->lengths) = pad_rows(rows, pad_id);
  for (const auto& r : rows) b->host_lengths.push_back(static_cast<int64_t>(r.size()));
  b->row_spans = train::right_padded_spans(b->host_lengths);
  b->ids = train::to_device(b->ids, device);
  b->lengths = train::to_device(b->lengths, device);
  if (!margins.empty()) {
    std::vector<double> m;
    for (const auto& p : pairs) {
      auto it = margins.find({p.source, p.line});
      m.push_back(it == margins.end() ? 0.0 : it->second);
    }
    b->margin = train::to_device(torch::tensor(m, torch::kFloat), device);
  }
  return b;
}

class RmStage : public train::TypedStage<Batch> {
 public:
  // With several ranks (`comm`), rank 0 prepares the data while the others wait; the run folder
  // must be on a filesystem every rank sees, as for checkpoints.
  RmStage(RmRecipe& r, const std::string& run_dir, parallel::Comm comm) : r_(r), comm_(std::move(comm)) {
    p_ = train::load_policy(r, train::run_device(r), "an SFT HF folder");
    // TRL: config.pad_token_id from the tokenizer, falling back to EOS.
    if (p_.pad_id < 0) throw Error("the tokenizer at " + p_.tok_path + " names neither a pad nor an EOS token; score pooling needs one");
    pad_id_ = p_.pad_id;
    if (!p_.model.has_score_head()) {
      // With LoRA the adapter goes onto model.path as it is: loading it (here, PEFT) pools at the base
      // config's pad_token_id when it names one, so train with that pooling too.
      if (r.lora.enabled && p_.model.config().pad_token_id) pad_id_ = static_cast<int64_t>(*p_.model.config().pad_token_id);
      p_.model.add_score_head(static_cast<uint64_t>(r.run.seed) + 1, pad_id_);
    } else if (p_.model.config().pad_token_id && *p_.model.config().pad_token_id != pad_id_) {
      pad_id_ = *p_.model.config().pad_token_id;  // a reward model keeps the pooling it was trained with
    }
    // model.lora.enabled: the base frozen, adapters attached; the score head is trained and saved with
    // the adapter (PEFT's modules_to_save for task_type SEQ_CLS). Otherwise every parameter trains.
    train::make_trainable(p_, r, run_dir, comm_, "SEQ_CLS");
    // TRL's RewardTrainer drops pairs over max_length rather than cutting them.
    splits_ = train::open_splits(r, run_dir, data::Format::kPreference, p_.tok_path, comm_, "preference JSONL files",
                                 [](data::PrepareOptions& o) { o.overlong = "drop"; });
    train_margins_ = read_margins(*splits_.train, r.rm.margin_column);
    if (splits_.eval) eval_margins_ = read_margins(*splits_.eval, r.rm.margin_column);
    if (r.rm.center_rewards_coefficient > 0) loss_opt_.center_rewards_coefficient = r.rm.center_rewards_coefficient;
    flops_per_token_ = train::decoder_flops_per_token(p_.model, r.data.max_seq_len, nullptr, nullptr, p_.lora.get());
  }

  // Each rank reads its share of every global micro-batch (datasets/loader.h): W ranks x B pairs see
  // the pairs 1 rank x W·B pairs sees.
  void set_rank(int rank, int world_size) override {
    PTK_CHECK(rank == comm_.rank() && world_size == comm_.world_size(),
              "RmStage::set_rank: the stage was built for rank " + std::to_string(comm_.rank()) + " of " +
                  std::to_string(comm_.world_size()) + "; pass the Trainer's comm to the RmStage constructor");
    train::set_loader_rank(splits_, rank, world_size);
  }
  optim::NamedTensors parameters() override { return train::trainable_parameters(p_); }
  int64_t micro_batches_per_epoch() const override { return splits_.loader->batches_per_epoch(); }
  Batch next_batch(int64_t* targets, int64_t* tokens) override {
    auto b = make_batch(data::make_preference_batch(*splits_.train, splits_.loader->next_rows()), pad_id_, train_margins_,
                        p_.device);
    *targets = b->pairs;
    *tokens = 0;
    for (int64_t n : b->host_lengths) *tokens += n;
    return std::move(*b);
  }
  std::string cursor_json() const override { return splits_.loader->cursor_json(); }
  void restore_cursor(const std::string& j) override { splits_.loader->restore_cursor(j); }

  // TRL: the micro-batch's mean loss divided by K; here scaled by pairs / the step's pairs, which is
  // that when micro-batches are equal and weights pairs correctly when they are not.
  train::LossOut batch_loss(const Batch& b, double n) override {
    auto [chosen, rejected] = scores(b);
    auto l = rm_loss(chosen, rejected, b.margin, loss_opt_);
    train::LossOut out;
    out.loss = l.loss * (static_cast<double>(b.pairs) / n);
    // Read back after the step (LossOut::read_back), not here.
    out.read_back = [this, c = chosen.detach(), r = rejected.detach()](train::LossOut& o) {
      RmMetricSums sums = rm_metric_sums(c, r);
      if (comm_.world_size() > 1) {
        // TRL takes min/max over every process's gathered scores (rm_loss.h); the loop averages plain
        // metrics over ranks, which is right for the means (equal pairs per rank) but not for these.
        at::Tensor t = torch::tensor({-sums.reward_min, sums.reward_max}, torch::kFloat64);
        comm_.all_reduce(t, parallel::ReduceOp::kMax);
        sums.reward_min = -t[0].item<double>();
        sums.reward_max = t[1].item<double>();
      }
      for (auto& [k, v] : rm_metrics(sums)) o.metrics.add(k, v);
    };
    return out;
  }

  void evaluate(Metrics* out) override {
    if (!splits_.eval) return;
    torch::NoGradGuard ng;
    const data::PreparedSet& set = *splits_.eval;
    const int64_t rows = set.num_rows(), mbs = r_.rm.eval_micro_batch_size;
    std::vector<at::Tensor> cs, rs, ms;
    for (int64_t s = 0; s < rows; s += mbs) {
      std::vector<int64_t> ids;
      for (int64_t i = s; i < std::min(rows, s + mbs); ++i) ids.push_back(i);
      auto b = make_batch(data::make_preference_batch(set, ids), pad_id_, eval_margins_, p_.device);
      auto [c, r] = scores(*b);
      cs.push_back(c);
      rs.push_back(r);
      ms.push_back(b->margin.defined() ? b->margin : torch::zeros({b->pairs}, c.options().dtype(torch::kFloat)));
    }
    if (cs.empty()) return;
    auto c = torch::cat(cs), r = torch::cat(rs);
    auto l = rm_loss(c, r, torch::cat(ms), loss_opt_);
    out->add("loss", l.loss.item<double>());
    for (auto& [k, v] : rm_metrics(rm_metric_sums(c, r))) out->add(k, v);
  }

  void save_model(const std::string& dir) override { train::save_policy_model(p_.model, p_, r_, dir); }
  void after_final(const std::string& run_dir) override { train::save_merged_final(p_, r_, run_dir); }
  double frozen_bytes() const override { return train::frozen_bytes(p_); }
  double flops_per_token() const override { return flops_per_token_; }

 private:
  std::pair<at::Tensor, at::Tensor> scores(const Batch& b) const {
    at::Tensor s = score_rows(p_.model, b.ids, b.lengths, pad_id_, r_.model.activation_checkpointing, b.row_spans);  // (2P)
    return {s.narrow(0, 0, b.pairs), s.narrow(0, b.pairs, b.pairs)};
  }

  RmRecipe& r_;
  parallel::Comm comm_;
  train::Policy p_;  // the reward model (p_.model, with its score head) and its tokenizer, on run.device
  int64_t pad_id_ = 0;
  train::Splits splits_;
  MarginMap train_margins_, eval_margins_;
  RmLossOptions loss_opt_;
  double flops_per_token_ = 0;
};

}  // namespace

std::unique_ptr<train::Stage> make_rm_stage(RmRecipe& r, const std::string& run_dir, parallel::Comm comm) {
  return std::make_unique<RmStage>(r, run_dir, std::move(comm));
}

std::string run_rm(RmRecipe& r, const std::string& recipe_file, const std::string& resolved) {
  std::string run_dir = train::run_dir_of(r, recipe_file);  // made by trainer_options, after the rerun check
  torch::manual_seed(static_cast<uint64_t>(r.run.seed));
  train::TrainerOptions options = train::trainer_options(r, run_dir, resolved, "rm");
  if (auto plan = train::memory_plan_from_recipe(r, train::StageKind::kRm)) {
    plan->eval_micro_batch_size = !data::has_eval_data(r.data) ? 0 : r.rm.eval_micro_batch_size;
    train::check_memory_estimate(r, *plan, options.comm);  // before the model, data or batches exist
  }
  RmStage stage(r, run_dir, options.comm);
  train::Trainer trainer(stage, std::move(options));
  log::info("rm: " + std::to_string(trainer.total_steps()) + " optimizer steps of " +
            std::to_string(r.train.micro_batch_size * r.train.grad_accum) + " pairs; run folder " + run_dir);
  trainer.run();
  return run_dir;
}

}  // namespace ptk::reward
