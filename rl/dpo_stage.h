// The offline-RL stage: DPO (or reference-free SimPO/CPO) on preference pairs, TRL's definitions
// (docs/FORMULAS.md section 2), from an SFT HF folder to an HF folder. Not the losses (rl/dpo_loss.h),
// not the loop, checkpoints or data parallelism (core/train), not GRPO.
//
// Algorithm: each micro-batch of P pairs runs through the policy as ONE batch of 2P right-padded
// rows (P prompt+chosen, then P prompt+rejected); the fused lm_head op scores only completion
// targets; their sums s(y±) minus the frozen reference's (precomputed once and cached beside the
// prepared shards, or computed live) feed dpo_loss (cpo_loss for SimPO/CPO, no reference).
// Scaling: each micro-batch counts ONE target, so the loop's step count N = K·ranks and
// loss/N is the mean over micro-batches and ranks of the micro-batch pair means, as TRL's Trainer
// (which divides each micro-batch loss by K, and DDP averages over ranks).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/config/sections.h"  // TrainingRecipe
#include "core/parallel/comm.h"         // Comm
#include "core/model/qwen2.h"      // Qwen2Model
#include "core/train/trainer.h"    // Stage
#include "datasets/loader.h"       // PairView, PreparedSet, Loader
#include "rl/dpo_loss.h"           // DpoLossOptions, CpoLossOptions
#include "eval/eval.h"          // HeldoutOptions

namespace ptk::rl {

// The `dpo` recipe section; option names follow TRL's DPOConfig / CPOConfig.
struct DpoSection : config::Section {
  std::string algorithm;               // dpo | cpo (TRL's DPOTrainer | CPOTrainer)
  std::vector<std::string> loss_type;  // one name or a list (dpo); one name (cpo)
  std::vector<double> loss_weights;
  double beta, label_smoothing, simpo_gamma, cpo_alpha, ld_alpha;
  std::string ref_path;
  std::string precompute_ref_log_probs;  // auto | true | false (DpoStage::precomputes_reference says which ran)
  int64_t precompute_ref_batch_size, eval_micro_batch_size;
  eval::HeldoutOptions heldout;  // dpo.eval_prompts, eval_verifier, ...: held-out accuracy
  const char* name() const override { return "dpo"; }
  const char* help() const override { return "offline RL: DPO against a frozen reference, or SimPO/CPO without one"; }
  void visit(config::Visitor& v) override;
  void validate(config::Errors& e) const override;

  bool is_cpo() const { return algorithm == "cpo"; }
  DpoLossOptions dpo_options() const;
  CpoLossOptions cpo_options() const;
  std::optional<double> ld() const;  // ld_alpha, or none when it is 1 (plain sums)
};

struct DpoRecipe : config::TrainingRecipe {
  DpoSection dpo;
  std::vector<config::Section*> all_sections() {
    auto s = sections();
    s.push_back(&dpo);
    return s;
  }
};

// A micro-batch as model input: 2P rows, P chosen then P rejected, each prompt + reply, right-padded.
struct PairBatch {
  at::Tensor ids;                // (2P, T) int64, pad_id past each row's tokens
  at::Tensor attention_mask;     // (2P, T) int64
  at::Tensor completion_mask;    // (2P, T) float32: 1 where token t is a reply token scored by position t-1
  at::Tensor completion_tokens;  // (2P) float32 n±: reply lengths (TRL's completion-mask sums)
  std::vector<int64_t> rows;     // (P) prepared row ids (index the precomputed reference)
  int64_t tokens = 0;            // real tokens in the 2P rows
  // Worked out on the host by make_pair_batch, so a step on another device reads nothing back
  // (undefined / empty / -1 in a hand-made batch: derived from the masks, on the host).
  at::Tensor target_index;       // (N) int64 flat r·T + t of the completion targets (nonzero(completion_mask))
  at::Tensor row_index;          // (P) int64 `rows` as a tensor on the batch's device
  std::vector<std::pair<int64_t, int64_t>> row_spans;  // (2P) {0, prompt + reply}: ForwardInput::row_spans
  int64_t chosen_targets = -1;   // completion targets in the P chosen rows
};
PairBatch make_pair_batch(const std::vector<data::PairView>& pairs, std::vector<int64_t> rows, int32_t pad_id);
// The batch's tensors on `device` (pinned, non-blocking copies on CUDA; see train::to_device).
PairBatch to_device(const PairBatch& host, const at::Device& device);

// A model's sequence log-probs on a PairBatch through the fused op, plus the metric numerators.
struct SequenceScores {
  at::Tensor logps;            // (2P) float32 s(y): completion sums (LD-DPO mix when ld_alpha), with grad if the model has
  at::Tensor plain_logps;      // (2P) the plain sums (= logps without ld_alpha): the sft term's
  double entropy_sum = 0;      // Σ H over every completion target (chosen and rejected)
  double targets = 0;          // number of completion targets
  double chosen_correct = 0;   // argmax hits on chosen targets
  double chosen_targets = 0;
  // DPO: Σ of the vocab-mean logit over chosen (rejected) targets and their count.
  // CPO: the mean over every chosen (rejected) row position, padding included, with count 1.
  double logits_chosen = 0, logits_chosen_count = 0, logits_rejected = 0, logits_rejected_count = 0;
  // With read=false: [entropy_sum, chosen_correct, logits_chosen, logits_rejected] as a float64 device
  // tensor (detached), the doubles above still 0 until read_stats(); targets, chosen_targets and the
  // counts are host facts, always set.
  at::Tensor stats;
};
void read_stats(SequenceScores& s);  // fills the four doubles from `stats` (one device read)
// `checkpointed`: recompute each decoder layer in backward (model.activation_checkpointing).
SequenceScores sequence_scores(const model::Qwen2Model& model, const PairBatch& batch,
                               std::optional<double> ld_alpha, bool cpo_logits = false, bool checkpointed = false,
                               bool read = true);

// Reference log-probs of every row of `set`: (rows, 2) float32 [s_ref(y⁺), s_ref(y⁻)], batches of
// `batch_size` pairs in stored order, no gradient; LD-DPO mixed with `ld_alpha` as the policy's are.
at::Tensor compute_ref_logps(const model::Qwen2Model& reference, const data::PreparedSet& set, int32_t pad_id,
                             int64_t batch_size, std::optional<double> ld_alpha = std::nullopt);

// The stage. Threading: one owner (the Trainer's thread).
class DpoStage : public train::TypedStage<PairBatch> {
 public:
  // With several ranks (`comm`), rank 0 prepares the data and writes the reference cache while the
  // others wait; the run folder must be on a filesystem every rank sees, as for checkpoints.
  // `live_reference_fits`: false when the memory estimate refuses a live reference beside the
  // policy, so that dpo.precompute_ref_log_probs=auto precomputes.
  DpoStage(DpoRecipe& recipe, const std::string& run_dir, parallel::Comm comm = parallel::Comm(),
           bool live_reference_fits = true);
  ~DpoStage() override;

  void set_rank(int rank, int world_size) override;
  optim::NamedTensors parameters() override;
  int64_t micro_batches_per_epoch() const override;
  PairBatch next_batch(int64_t* targets, int64_t* tokens) override;  // on run.device
  std::string cursor_json() const override;
  void restore_cursor(const std::string& json) override;
  train::LossOut batch_loss(const PairBatch& batch, double step_targets) override;
  // data.eval pair metrics (TRL's names) plus, with dpo.eval_prompts, held-out accuracy.
  void evaluate(Metrics* out) override;
  void evaluate_pairs(Metrics* out);
  // Held-out accuracy before the first step of a fresh run (dpo.eval_at_start), logged and written
  // to run_dir/eval_start.json.
  void heldout_at_start(bool fresh);
  // final/ and checkpoints: the HF folder, or with model.lora the PEFT adapter folder (CAUSAL_LM);
  // after_final writes final-merged/ with model.lora.save_merged.
  void save_model(const std::string& dir) override;
  void after_final(const std::string& run_dir) override;
  double frozen_bytes() const override;
  double flops_per_token() const override;

  // For tests and tools.
  const model::Qwen2Model& policy() const;
  // The live reference (undefined model when precomputed after the pass, or for cpo). With
  // model.lora and no dpo.ref_path: the policy with its adapters off (its frozen base, not a copy).
  const model::Qwen2Model& reference() const;
  // Reference log-probs of prepared training rows: (P, 2), from the cache or the live model.
  at::Tensor ref_logps(const PairBatch& batch);
  // The cache file of the training split's reference log-probs ("" when live or cpo).
  const std::string& ref_cache_path() const;
  // Whether the reference log-probs are precomputed (dpo.precompute_ref_log_probs resolved; false
  // for cpo), and why, in words.
  bool precomputes_reference() const;
  const std::string& reference_mode_reason() const;
  const data::PreparedSet& train_set() const;
  int32_t pad_id() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Runs the whole stage: prepare (or reuse) data, load policy and reference, precompute (or reuse)
// reference log-probs, train with core/train's loop, write run_dir/final. Returns the run folder.
std::string run_dpo(DpoRecipe& recipe, const std::string& recipe_file, const std::string& resolved_recipe);

}  // namespace ptk::rl
