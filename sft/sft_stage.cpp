#include "sft/sft_stage.h"

#include <torch/torch.h>

#include <cmath>

#include "core/parallel/comm.h"
#include "core/model/qwen2.h"
#include "core/runtime/log.h"
#include "core/tokenizer/tokenizer.h"
#include "core/train/from_recipe.h"
#include "core/train/stage_setup.h"
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

// A micro-batch on the model's device. Host-side facts (target positions, document lengths, row
// spans) are worked out on the host before the copy, so the step reads nothing back.
struct Batch {
  at::Tensor ids, positions, attention_mask;  // (B, T); positions for packed rows, the mask for padded rows
  at::Tensor target_index, targets;           // (M): flat predicting positions b·(T-1) + s-1, their token ids
  std::vector<std::vector<int64_t>> doc_lengths;
  std::vector<std::pair<int64_t, int64_t>> row_spans;
};

Batch to_batch(const data::SftBatch& b, const at::Device& device) {
  Batch out;
  const int64_t B = b.rows, T = b.seq_len;
  at::Tensor ids = torch::from_blob(const_cast<int32_t*>(b.input_ids.data()), {B, T}, torch::kInt32).to(torch::kInt64);
  at::Tensor mask = torch::from_blob(const_cast<uint8_t*>(b.loss_mask.data()), {B, T}, torch::kUInt8).to(torch::kBool);
  auto [index, targets] = target_index(torch::where(mask, ids, torch::full({}, -100, torch::kInt64)));
  out.ids = train::to_device(ids, device);
  out.target_index = train::to_device(index, device);
  out.targets = train::to_device(targets, device);
  if (!b.doc_lengths.empty()) {
    out.doc_lengths = b.doc_lengths;
    out.positions = train::to_device(
        torch::from_blob(const_cast<int32_t*>(b.positions.data()), {B, T}, torch::kInt32).to(torch::kInt64), device);
  } else {
    at::Tensor lens = torch::tensor(b.row_lengths, torch::kInt64).unsqueeze(1);
    out.attention_mask = train::to_device(torch::arange(T, torch::kInt64).unsqueeze(0).lt(lens).to(torch::kInt64), device);
    out.row_spans = train::right_padded_spans(b.row_lengths);
  }
  return out;
}

class SftStage : public train::TypedStage<Batch> {
 public:
  // With several ranks, rank 0 prepares the data while the others wait (the run folder must be on
  // a filesystem every rank sees, as for checkpoints).
  SftStage(SftRecipe& r, const std::string& run_dir, parallel::Comm& comm) : r_(r), run_dir_(run_dir), comm_(&comm) {
    p_ = train::load_policy(r, train::run_device(r), "an HF folder");
    train::make_trainable(p_, r, run_dir, comm, "CAUSAL_LM");
    heldout_ = eval::Heldout(r.sft.heldout, p_.tokenizer);
    splits_ = train::open_splits(r, run_dir, data::Format::kSft, p_.tok_path, comm, "training JSONL files");
    flops_per_token_ = train::decoder_flops_per_token(p_.model, r.data.max_seq_len, nullptr, nullptr, p_.lora.get());
  }

  void set_rank(int rank, int world_size) override { train::set_loader_rank(splits_, rank, world_size); }
  optim::NamedTensors parameters() override { return train::trainable_parameters(p_); }
  int64_t micro_batches_per_epoch() const override { return splits_.loader->batches_per_epoch(); }
  Batch next_batch(int64_t* targets, int64_t* tokens) override {
    auto rows = splits_.loader->next_rows();
    auto b = data::make_sft_batch(*splits_.train, rows, p_.pad_id);
    *targets = b.targets;
    *tokens = b.tokens;
    return to_batch(b, p_.device);
  }
  std::string cursor_json() const override { return splits_.loader->cursor_json(); }
  void restore_cursor(const std::string& j) override { splits_.loader->restore_cursor(j); }

  train::LossOut batch_loss(const Batch& b, double n) override {
    SftTermTensors t = terms(b);
    train::LossOut out;
    out.loss = t.nll_sum / n;
    // Numerators and denominators are summed over ranks before dividing (docs/FORMULAS.md section 1).
    // Device tensors, read by the loop with the step's one copy to the host.
    const at::Tensor targets = at::scalar_tensor(static_cast<double>(t.targets), t.entropy_sum.options().dtype(at::kDouble));
    out.tensor_ratios.push_back({"mean_token_accuracy", t.correct, targets});
    out.tensor_ratios.push_back({"entropy", t.entropy_sum, targets});
    return out;
  }

  void evaluate(Metrics* out) override {
    evaluate_loss(out);
    evaluate_heldout(out);
  }

  void evaluate_loss(Metrics* out) {
    if (!splits_.eval) return;
    torch::NoGradGuard ng;
    const data::PreparedSet& set = *splits_.eval;
    const int64_t rows = set.num_rows(), mbs = r_.sft.eval_micro_batch_size;
    double nll = 0, ent = 0;
    int64_t correct = 0, targets = 0;
    for (int64_t s = 0; s < rows; s += mbs) {
      std::vector<int64_t> ids;
      for (int64_t i = s; i < std::min(rows, s + mbs); ++i) ids.push_back(i);
      SftTermTensors t = terms(to_batch(data::make_sft_batch(set, ids, p_.pad_id), p_.device));
      if (t.targets == 0) continue;
      nll += t.nll_sum.item<double>();
      ent += t.entropy_sum.item<double>();
      correct += t.correct.item<int64_t>();
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
    heldout_.run(p_.model, out, comm_);
  }
  void heldout_at_start(bool fresh) const {
    torch::NoGradGuard ng;
    heldout_.run_at_start(p_.model, comm_, fresh, run_dir_, "sft");
  }

  void save_model(const std::string& dir) override { train::save_policy_model(p_.model, p_, r_, dir); }
  void after_final(const std::string& run_dir) override { train::save_merged_final(p_, r_, run_dir); }
  double frozen_bytes() const override { return train::frozen_bytes(p_); }
  double flops_per_token() const override { return flops_per_token_; }

 private:
  SftTermTensors terms(const Batch& b) const {
    model::ForwardInput in;
    in.input_ids = b.ids;
    if (!b.doc_lengths.empty()) {
      in.doc_lengths = b.doc_lengths;
      in.positions = b.positions;
    } else {
      in.attention_mask = b.attention_mask;
      in.row_spans = b.row_spans;
    }
    model::ForwardOptions fo;
    fo.logits = false;  // the fused op projects only target rows
    fo.activation_checkpointing = r_.model.activation_checkpointing;
    auto out = p_.model.forward(in, fo);
    return sft_term_tensors(out.hidden, p_.model.lm_head_weight(), b.target_index, b.targets);
  }

  SftRecipe& r_;
  std::string run_dir_;
  parallel::Comm* comm_;
  train::Policy p_;
  eval::Heldout heldout_;
  train::Splits splits_;
  double flops_per_token_ = 0;
};

}  // namespace

std::unique_ptr<train::Stage> make_sft_stage(SftRecipe& r, const std::string& run_dir, parallel::Comm& comm) {
  return std::make_unique<SftStage>(r, run_dir, comm);
}

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
