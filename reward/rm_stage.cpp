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
                      int64_t pad_id, bool checkpointed) {
  const int64_t T = ids.size(1);
  at::Tensor pos = torch::arange(T, torch::kInt64).unsqueeze(0);  // (1, T)
  model::ForwardInput in;
  in.input_ids = ids;
  in.attention_mask = pos.lt(lengths.unsqueeze(1)).to(torch::kInt64);  // (R, T)
  model::ForwardOptions fo;
  fo.logits = false;
  fo.activation_checkpointing = checkpointed;
  auto out = model.forward(in, fo);
  // transformers' Qwen2ForSequenceClassification pooling: the rightmost non-pad token (with
  // pad == eos, the token before an appended EOS).
  return model.score(out.hidden, model::score_index(ids, in.attention_mask, pad_id));  // (R)
}

namespace {

struct Batch {
  at::Tensor ids, lengths;  // (2P, T), (2P): P chosen rows then P rejected rows
  at::Tensor margin;        // (P) or undefined
  int64_t pairs = 0;
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

std::shared_ptr<Batch> make_batch(const std::vector<data::PairView>& pairs, int64_t pad_id, const MarginMap& margins) {
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
  if (!margins.empty()) {
    std::vector<double> m;
    for (const auto& p : pairs) {
      auto it = margins.find({p.source, p.line});
      m.push_back(it == margins.end() ? 0.0 : it->second);
    }
    b->margin = torch::tensor(m, torch::kFloat);
  }
  return b;
}

class RmStage : public train::Stage {
 public:
  // With several ranks (`comm`), rank 0 prepares the data while the others wait; the run folder
  // must be on a filesystem every rank sees, as for checkpoints.
  RmStage(RmRecipe& r, const std::string& run_dir, parallel::Comm comm) : r_(r), comm_(std::move(comm)) {
    tok_path_ = !r.tokenizer.path.empty() ? r.tokenizer.path : r.model.path;
    if (tok_path_.empty())
      throw Error("no tokenizer: set tokenizer.path (a folder with tokenizer.json, or the file) or model.path");
    tok_dir_ = path_exists(tok_path_ + "/tokenizer.json") ? tok_path_ : parent_dir(tok_path_);
    auto tok = tokenizer::Tokenizer::load(tok_path_, tokenizer::chat_load_options(r.tokenizer.chat_template, r.tokenizer.chat_template_kwargs));
    if (tok.chat_template_overridden()) chat_template_ = tok.chat_template_source();
    // TRL: config.pad_token_id from the tokenizer, falling back to EOS.
    pad_id_ = tok.pad_id() >= 0 ? tok.pad_id() : tok.eos_id();
    if (pad_id_ < 0) throw Error("the tokenizer at " + tok_path_ + " names neither a pad nor an EOS token; score pooling needs one");
    model_ = train::load_model(r.model, r.run.seed, "an SFT HF folder");
    if (!model_.has_score_head()) {
      model_.add_score_head(static_cast<uint64_t>(r.run.seed) + 1, pad_id_);
    } else if (model_.config().pad_token_id && *model_.config().pad_token_id != pad_id_) {
      pad_id_ = *model_.config().pad_token_id;  // a reward model keeps the pooling it was trained with
    }
    if (static_cast<int64_t>(tok.vocab_size()) > model_.config().vocab_size)
      throw Error("the tokenizer at " + tok_path_ + " has " + std::to_string(tok.vocab_size()) +
                  " ids but the model's vocab_size is " + std::to_string(model_.config().vocab_size) +
                  "\n---> HINT: the model and tokenizer do not belong together; check model.path / tokenizer.path");
    model_.set_requires_grad(true);
    if (r.data.train.empty()) throw Error("data.train is empty: name the preference JSONL files");
    auto popt = data::prepare_options_from_recipe(r.data, r.tokenizer, r.model, r.run.seed, data::Format::kPreference);
    popt.tokenizer_path = tok_path_;
    popt.overlong = "drop";  // TRL's RewardTrainer drops pairs over max_length rather than cutting them
    std::string train_dir = data::prepared_dir(run_dir, "train"), eval_dir = data::prepared_dir(run_dir, "eval");
    data::PrepareOptions eopt;
    if (data::has_eval_data(r.data)) {
      eopt = data::prepare_options_from_recipe(r.data, r.tokenizer, r.model, r.run.seed, data::Format::kPreference, true);
      eopt.tokenizer_path = tok_path_;
      eopt.overlong = "drop";
    }
    if (comm_.rank() == 0) {
      data::ensure_prepared(popt, train_dir);
      if (data::has_eval_data(r.data)) data::ensure_prepared(eopt, eval_dir);
    }
    comm_.barrier();
    train_ = std::make_unique<data::PreparedSet>(data::PreparedSet::open(train_dir));
    train_margins_ = read_margins(*train_, r.rm.margin_column);
    data::LoaderOptions lo;
    lo.micro_batch_size = r.train.micro_batch_size;
    lo.seed = static_cast<uint64_t>(r.run.seed);
    loader_ = std::make_unique<data::Loader>(*train_, lo);
    if (data::has_eval_data(r.data)) {
      eval_ = std::make_unique<data::PreparedSet>(data::PreparedSet::open(eval_dir));
      eval_margins_ = read_margins(*eval_, r.rm.margin_column);
    }
    if (r.rm.center_rewards_coefficient > 0) loss_opt_.center_rewards_coefficient = r.rm.center_rewards_coefficient;
    const auto& c = model_.config();
    int64_t n_params = 0;
    // MFU counts the decoder's matmuls: not the embedding (a lookup) nor the output layer, which
    // ptk projects for target tokens only (Qwen2.5-0.5B: 136M of 494M parameters, 1.38x too many FLOPs).
    for (auto& [n, t] : model_.named_parameters())
      if (n.find("embed_tokens") == std::string::npos && n.find("lm_head") == std::string::npos) n_params += t.numel();
    flops_per_token_ = 6.0 * n_params + 6.0 * c.num_hidden_layers * c.num_attention_heads * c.head_dim *
                                            static_cast<double>(r.data.max_seq_len) / 2.0;
  }

  // Each rank reads its share of every global micro-batch (datasets/loader.h): W ranks x B pairs see
  // the pairs 1 rank x W·B pairs sees.
  void set_rank(int rank, int world_size) override {
    PTK_CHECK(rank == comm_.rank() && world_size == comm_.world_size(),
              "RmStage::set_rank: the stage was built for rank " + std::to_string(comm_.rank()) + " of " +
                  std::to_string(comm_.world_size()) + "; pass the Trainer's comm to the RmStage constructor");
    data::LoaderOptions lo = loader_->options();
    lo.rank = rank;
    lo.world_size = world_size;
    loader_ = std::make_unique<data::Loader>(*train_, lo);
  }
  optim::NamedTensors parameters() override { return model_.named_parameters(); }
  int64_t micro_batches_per_epoch() const override { return loader_->batches_per_epoch(); }
  train::MicroBatch next_micro_batch() override {
    auto b = make_batch(data::make_preference_batch(*train_, loader_->next_rows()), pad_id_, train_margins_);
    return {b, b->pairs, b->lengths.sum().item<int64_t>()};
  }
  std::string cursor_json() const override { return loader_->cursor_json(); }
  void restore_cursor(const std::string& j) override { loader_->restore_cursor(j); }

  // TRL: the micro-batch's mean loss divided by K; here scaled by pairs / the step's pairs, which is
  // that when micro-batches are equal and weights pairs correctly when they are not.
  train::LossOut loss(const train::MicroBatch& mb, double n) override {
    auto& b = *static_cast<Batch*>(mb.data.get());
    auto [chosen, rejected] = scores(b);
    auto l = rm_loss(chosen, rejected, b.margin, loss_opt_);
    train::LossOut out;
    out.loss = l.loss * (static_cast<double>(b.pairs) / n);
    RmMetricSums sums = rm_metric_sums(chosen.detach(), rejected.detach());
    if (comm_.world_size() > 1) {
      // TRL takes min/max over every process's gathered scores (rm_loss.h); the loop averages plain
      // metrics over ranks, which is right for the means (equal pairs per rank) but not for these.
      at::Tensor t = torch::tensor({-sums.reward_min, sums.reward_max}, torch::kFloat64);
      comm_.all_reduce(t, parallel::ReduceOp::kMax);
      sums.reward_min = -t[0].item<double>();
      sums.reward_max = t[1].item<double>();
    }
    for (auto& [k, v] : rm_metrics(sums)) out.metrics.add(k, v);
    return out;
  }

  void evaluate(Metrics* out) override {
    if (!eval_) return;
    torch::NoGradGuard ng;
    const int64_t rows = eval_->num_rows(), mbs = r_.rm.eval_micro_batch_size;
    std::vector<at::Tensor> cs, rs, ms;
    for (int64_t s = 0; s < rows; s += mbs) {
      std::vector<int64_t> ids;
      for (int64_t i = s; i < std::min(rows, s + mbs); ++i) ids.push_back(i);
      auto b = make_batch(data::make_preference_batch(*eval_, ids), pad_id_, eval_margins_);
      auto [c, r] = scores(*b);
      cs.push_back(c);
      rs.push_back(r);
      ms.push_back(b->margin.defined() ? b->margin : torch::zeros({b->pairs}, torch::kFloat));
    }
    if (cs.empty()) return;
    auto c = torch::cat(cs), r = torch::cat(rs);
    auto l = rm_loss(c, r, torch::cat(ms), loss_opt_);
    out->add("loss", l.loss.item<double>());
    for (auto& [k, v] : rm_metrics(rm_metric_sums(c, r))) out->add(k, v);
  }

  void save_model(const std::string& dir) override {
    checkpoint::SaveOptions so;
    so.source_dir = tok_dir_;
    so.chat_template = chat_template_;
    so.max_shard_bytes = r_.checkpoint.max_shard_bytes();
    model_.save_pretrained(dir, so);
  }
  double flops_per_token() const override { return flops_per_token_; }

 private:
  std::pair<at::Tensor, at::Tensor> scores(const Batch& b) const {
    at::Tensor s = score_rows(model_, b.ids, b.lengths, pad_id_, r_.model.activation_checkpointing);  // (2P)
    return {s.narrow(0, 0, b.pairs), s.narrow(0, b.pairs, b.pairs)};
  }

  RmRecipe& r_;
  parallel::Comm comm_;
  std::string tok_path_, tok_dir_;
  std::string chat_template_;  // written into saved folders when tokenizer.chat_template overrides the folder's
  int64_t pad_id_ = 0;
  model::Qwen2Model model_;
  std::unique_ptr<data::PreparedSet> train_, eval_;
  std::unique_ptr<data::Loader> loader_;
  MarginMap train_margins_, eval_margins_;
  RmLossOptions loss_opt_;
  double flops_per_token_ = 0;
};

}  // namespace

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
