#include "sft/sft_stage.h"

#include <torch/torch.h>

#include <cmath>

#include "core/parallel/comm.h"
#include "core/model/qwen2.h"
#include "core/runtime/log.h"
#include "core/tokenizer/tokenizer.h"
#include "core/train/from_recipe.h"
#include "core/train/trainer.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "datasets/loader.h"
#include "datasets/prepare.h"
#include "sft/sft_loss.h"

namespace ptk::sft {

void SftSection::visit(config::Visitor& v) {
  v.opt(eval_micro_batch_size, "eval_micro_batch_size", 8, "rows per forward for the eval loss (data.eval)");
  heldout.visit(v);
}

void SftSection::validate(config::Errors& e) const {
  if (eval_micro_batch_size < 1) e.add("sft.eval_micro_batch_size must be >= 1");
  heldout.validate(e, "sft");
}

namespace {

struct Batch {
  at::Tensor ids, positions, labels, attention_mask;  // (B, T)
  std::vector<std::vector<int64_t>> doc_lengths;
};

std::shared_ptr<Batch> to_tensors(const data::SftBatch& b) {
  auto out = std::make_shared<Batch>();
  const int64_t B = b.rows, T = b.seq_len;
  out->ids = torch::from_blob(const_cast<int32_t*>(b.input_ids.data()), {B, T}, torch::kInt32).to(torch::kInt64);
  out->positions = torch::from_blob(const_cast<int32_t*>(b.positions.data()), {B, T}, torch::kInt32).to(torch::kInt64);
  at::Tensor mask = torch::from_blob(const_cast<uint8_t*>(b.loss_mask.data()), {B, T}, torch::kUInt8).to(torch::kBool);
  out->labels = torch::where(mask, out->ids, torch::full({}, -100, torch::kInt64));
  if (!b.doc_lengths.empty()) {
    out->doc_lengths = b.doc_lengths;
  } else {
    at::Tensor lens = torch::tensor(b.row_lengths, torch::kInt64).unsqueeze(1);
    out->attention_mask = torch::arange(T, torch::kInt64).unsqueeze(0).lt(lens).to(torch::kInt64);
  }
  return out;
}

class SftStage : public train::Stage {
 public:
  // With several ranks, rank 0 prepares the data while the others wait (the run folder must be on
  // a filesystem every rank sees, as for checkpoints).
  SftStage(SftRecipe& r, const std::string& run_dir, parallel::Comm& comm) : r_(r), run_dir_(run_dir), comm_(&comm) {
    // Tokenizer: tokenizer.path, else model.path.
    tok_path_ = !r.tokenizer.path.empty() ? r.tokenizer.path : r.model.path;
    if (tok_path_.empty())
      throw Error("no tokenizer: set tokenizer.path (a folder with tokenizer.json, or the file) or model.path");
    tok_dir_ = path_exists(tok_path_ + "/tokenizer.json") ? tok_path_ : parent_dir(tok_path_);
    auto tok_ptr = std::make_shared<const tokenizer::Tokenizer>(tokenizer::Tokenizer::load(tok_path_, tokenizer::chat_load_options(r.tokenizer.chat_template, r.tokenizer.chat_template_kwargs)));
    const auto& tok = *tok_ptr;
    if (tok.chat_template_overridden()) chat_template_ = tok.chat_template_source();
    pad_id_ = tok.pad_id() >= 0 ? tok.pad_id() : tok.eos_id();
    heldout_ = eval::Heldout(r.sft.heldout, tok_ptr);
    // Model.
    model_ = train::load_model(r.model, r.run.seed, "an HF folder");
    if (static_cast<int64_t>(tok.vocab_size()) > model_.config().vocab_size)
      throw Error("the tokenizer at " + tok_path_ + " has " + std::to_string(tok.vocab_size()) +
                  " ids but the model's vocab_size is " + std::to_string(model_.config().vocab_size) +
                  "\n---> HINT: the model and tokenizer do not belong together; check model.path / tokenizer.path");
    model_.set_requires_grad(true);
    // Data.
    if (r.data.train.empty()) throw Error("data.train is empty: name the training JSONL files");
    auto popt = data::prepare_options_from_recipe(r.data, r.tokenizer, r.model, r.run.seed, data::Format::kSft);
    popt.tokenizer_path = tok_path_;
    std::string train_dir = data::prepared_dir(run_dir, "train"), eval_dir = data::prepared_dir(run_dir, "eval");
    data::PrepareOptions eopt;
    if (data::has_eval_data(r.data)) {
      eopt = data::prepare_options_from_recipe(r.data, r.tokenizer, r.model, r.run.seed, data::Format::kSft, true);
      eopt.tokenizer_path = tok_path_;
    }
    if (comm.rank() == 0) {
      data::ensure_prepared(popt, train_dir);
      if (data::has_eval_data(r.data)) data::ensure_prepared(eopt, eval_dir);
    }
    comm.barrier();
    train_ = std::make_unique<data::PreparedSet>(data::PreparedSet::open(train_dir));
    data::LoaderOptions lo;
    lo.micro_batch_size = r.train.micro_batch_size;
    lo.seed = static_cast<uint64_t>(r.run.seed);
    loader_ = std::make_unique<data::Loader>(*train_, lo);
    if (data::has_eval_data(r.data)) eval_ = std::make_unique<data::PreparedSet>(data::PreparedSet::open(eval_dir));
    const auto& c = model_.config();
    int64_t n_params = 0;
    // MFU counts the decoder's matmuls: not the embedding (a lookup) nor the output layer, which
    // ptk projects for target tokens only (Qwen2.5-0.5B: 136M of 494M parameters, 1.38x too many FLOPs).
    for (auto& [n, t] : model_.named_parameters())
      if (n.find("embed_tokens") == std::string::npos && n.find("lm_head") == std::string::npos) n_params += t.numel();
    // 6N for the dense weights plus causal attention (QK^T and AV forward+backward, half masked).
    flops_per_token_ = 6.0 * n_params + 6.0 * c.num_hidden_layers * c.num_attention_heads * c.head_dim *
                                            static_cast<double>(r.data.max_seq_len) / 2.0;
  }

  void set_rank(int rank, int world_size) override {
    data::LoaderOptions lo = loader_->options();
    lo.rank = rank;
    lo.world_size = world_size;
    loader_ = std::make_unique<data::Loader>(*train_, lo);
  }
  optim::NamedTensors parameters() override { return model_.named_parameters(); }
  int64_t micro_batches_per_epoch() const override { return loader_->batches_per_epoch(); }
  train::MicroBatch next_micro_batch() override {
    auto rows = loader_->next_rows();
    auto b = data::make_sft_batch(*train_, rows, pad_id_);
    return {to_tensors(b), b.targets, b.tokens};
  }
  std::string cursor_json() const override { return loader_->cursor_json(); }
  void restore_cursor(const std::string& j) override { loader_->restore_cursor(j); }

  train::LossOut loss(const train::MicroBatch& mb, double n) override {
    auto& b = *static_cast<Batch*>(mb.data.get());
    SftTerms t = terms(b);
    train::LossOut out;
    out.loss = t.nll_sum / n;
    // Numerators and denominators are summed over ranks before dividing (docs/FORMULAS.md section 1).
    out.ratios.push_back({"mean_token_accuracy", static_cast<double>(t.correct), static_cast<double>(t.targets)});
    out.ratios.push_back({"entropy", t.entropy_sum, static_cast<double>(t.targets)});
    return out;
  }

  void evaluate(Metrics* out) override {
    evaluate_loss(out);
    evaluate_heldout(out);
  }

  void evaluate_loss(Metrics* out) {
    if (!eval_) return;
    torch::NoGradGuard ng;
    data::LoaderOptions lo;
    lo.micro_batch_size = r_.sft.eval_micro_batch_size;
    lo.shuffle = false;
    int64_t rows = eval_->num_rows();
    double nll = 0, ent = 0;
    int64_t correct = 0, targets = 0;
    for (int64_t s = 0; s < rows; s += lo.micro_batch_size) {
      std::vector<int64_t> ids;
      for (int64_t i = s; i < std::min(rows, s + lo.micro_batch_size); ++i) ids.push_back(i);
      auto b = to_tensors(data::make_sft_batch(*eval_, ids, pad_id_));
      SftTerms t = terms(*b);
      nll += t.nll_sum.item<double>();
      ent += t.entropy_sum;
      correct += t.correct;
      targets += t.targets;
    }
    if (targets > 0) {
      out->add("loss", nll / targets).add("mean_token_accuracy", static_cast<double>(correct) / targets);
      out->add("entropy", ent / targets);
    }
  }

  // Held-out accuracy (sft.eval_prompts) through ptk eval's code; global over ranks.
  void evaluate_heldout(Metrics* out) const {
    torch::NoGradGuard ng;
    heldout_.run(model_, out, comm_);
  }
  void heldout_at_start(bool fresh) const {
    torch::NoGradGuard ng;
    heldout_.run_at_start(model_, comm_, fresh, run_dir_, "sft");
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
  SftTerms terms(const Batch& b) const {
    model::ForwardInput in;
    in.input_ids = b.ids;
    if (!b.doc_lengths.empty()) {
      in.doc_lengths = b.doc_lengths;
      in.positions = b.positions;
    } else {
      in.attention_mask = b.attention_mask;
    }
    model::ForwardOptions fo;
    fo.logits = false;  // the fused op projects only target rows
    fo.activation_checkpointing = r_.model.activation_checkpointing;
    auto out = model_.forward(in, fo);
    return sft_terms(out.hidden, model_.lm_head_weight(), b.labels);
  }

  SftRecipe& r_;
  std::string run_dir_, tok_path_, tok_dir_;
  std::string chat_template_;  // written into saved folders when tokenizer.chat_template overrides the folder's
  parallel::Comm* comm_;
  eval::Heldout heldout_;
  int32_t pad_id_ = 0;
  model::Qwen2Model model_;
  std::unique_ptr<data::PreparedSet> train_, eval_;
  std::unique_ptr<data::Loader> loader_;
  double flops_per_token_ = 0;
};

}  // namespace

std::string run_sft(SftRecipe& r, const std::string& recipe_file, const std::string& resolved) {
  std::string run_dir = train::run_dir_of(r, recipe_file);  // made by trainer_options, after the rerun check
  torch::manual_seed(static_cast<uint64_t>(r.run.seed));
  train::TrainerOptions options = train::trainer_options(r, run_dir, resolved, "sft");
  if (auto plan = train::memory_plan_from_recipe(r, train::StageKind::kSft)) {
    plan->eval_micro_batch_size = !data::has_eval_data(r.data) ? 0 : r.sft.eval_micro_batch_size;
    plan->heldout_new_tokens = r.sft.heldout.prompts.empty() ? 0 : r.sft.heldout.max_new_tokens;
    train::check_memory_estimate(r, *plan, options.comm);  // before the model, data or batches exist
  }
  SftStage stage(r, run_dir, options.comm);
  train::Trainer trainer(stage, options);
  log::info("sft: " + std::to_string(trainer.total_steps()) + " optimizer steps of " +
            std::to_string(r.train.micro_batch_size * r.train.grad_accum) + " rows; run folder " + run_dir);
  stage.heldout_at_start(train::is_fresh_run(r, run_dir));
  trainer.run();
  return run_dir;
}

}  // namespace ptk::sft
