// The GRPO stage (online RL) on core/train's loop, TRL's definitions (docs/FORMULAS.md section 4).
// Algorithm: every num_iterations optimizer steps, take B prompts, sample G completions each with
// the rollout engine from the policy's own weights, score them with rule verifiers and/or reward
// servers, turn rewards
// into group-relative advantages, then minimize the clipped surrogate (+ beta * k3 KL to a frozen
// reference) over those completions for num_iterations passes. Not the loss math (grpo_loss.h),
// not generation (rollout/engine.h), not the loop, resume or data parallelism (core/train).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/config/sections.h"  // TrainingRecipe
#include "core/parallel/comm.h"        // Comm
#include "core/train/trainer.h"    // Stage
#include "rl/grpo_loss.h"          // GrpoMicroBatch, GrpoLossOptions, GrpoScaling
#include "rollout/engine.h"        // Stats

namespace ptk::model {
class Qwen2Model;
}
namespace ptk::train {
struct MemoryPlan;  // core/train/memory_estimate.h
}

namespace ptk::rl {

// The `grpo` recipe section: TRL GRPOConfig's names where TRL has the option.
struct GrpoSection : config::Section {
  // Generation
  int64_t num_generations, max_completion_length, top_k;
  double temperature, top_p;
  // Rewards
  std::vector<std::string> reward_funcs;  // rule verifiers by name (reward/verifiers.h)
  std::vector<double> reward_weights;     // one per reward_funcs entry; empty = all 1
  // Reward servers (OpenRLHF's /get_reward protocol, `ptk reward-server`): one more source, `remote`
  std::vector<std::string> reward_urls;
  double remote_reward_weight, reward_timeout_s;
  int64_t reward_max_attempts;
  std::string reward_api_key;
  std::string scale_rewards, multi_objective_aggregation;
  // Objective
  std::string loss_type, importance_sampling_level;
  double beta, epsilon, epsilon_high, delta, top_entropy_quantile;
  int64_t num_iterations;
  bool mask_truncated_completions, use_bias_correction_kl;
  // Sampler/trainer importance-sampling correction (TRL's vllm_* options; here the sampler is ptk's engine)
  bool vllm_importance_sampling_correction;
  std::string vllm_importance_sampling_mode;
  double vllm_importance_sampling_clip_min, vllm_importance_sampling_clip_max;
  // Beyond TRL
  bool dynamic_sampling;
  int64_t dynamic_sampling_max_rounds;
  std::string prompt_order;
  // Logging and eval
  int64_t log_rollouts_every, eval_max_prompts, eval_max_new_tokens, eval_num_samples;
  std::string eval_verifier;
  bool eval_at_start;
  // Placement (full fine-tuning with beta != 0): where the frozen reference copy lives between steps
  std::string reference_device;

  const char* name() const override { return "grpo"; }
  const char* help() const override { return "GRPO: sampling, rewards, advantages, clipped objective (TRL names)"; }
  void visit(config::Visitor& v) override;
  void validate(config::Errors& e) const override;
};

// The `rollout` recipe section: engine settings that do not change the algorithm.
struct RolloutSection : config::Section {
  int64_t slots;
  double gpu_memory_fraction;
  bool cuda_graphs;
  std::string device_loop;  // auto | on | off
  const char* name() const override { return "rollout"; }
  const char* help() const override { return "the generation engine (KV-cache slots)"; }
  void visit(config::Visitor& v) override;
  void validate(config::Errors& e) const override;
};

struct GrpoRecipe : config::TrainingRecipe {
  GrpoSection grpo;
  RolloutSection rollout;
  std::vector<config::Section*> all_sections() {
    auto s = sections();
    s.push_back(&grpo);
    s.push_back(&rollout);
    return s;
  }
  // Cross-section checks (grpo vs train/checkpoint keys): adds each problem to `e` (for
  // config::bind_recipe's extra_checks, so they come with the recipe's other errors).
  void cross_check(config::Errors& e) const;
  // The same, throwing one ptk::Error listing every problem.
  void check() const;
};

// A reward source written in C++ (library users, tests), usable in grpo.reward_funcs by `name`
// beside the rule verifiers: the reward of one completion's text given the prompt's answer; NaN = none.
// Called on the stage's thread.
struct RewardFunction {
  std::string name;
  std::function<double(const std::string& completion, const std::string& answer)> fn;
};

// What the last loss() fed to grpo_loss, for tests that recompute it independently.
struct GrpoLossInputs {
  GrpoMicroBatch batch;
  GrpoLossOptions options;
  GrpoScaling scaling;
  at::Tensor input_ids, attention_mask;  // (B, L) prompt + completion, right-padded
  at::Tensor completion_ids;             // (B, Tc)
  std::vector<int64_t> prompt_lengths;   // (B)
  int64_t pass = 0;                      // 0 .. num_iterations-1
};

struct GrpoSlice;  // one micro-batch's rows of a generation batch, on the policy's device (grpo_stage.cpp)
// A GRPO micro-batch: one pass (0 .. num_iterations-1) over one slice of a generation batch.
struct GrpoMicroBatchData {
  std::shared_ptr<GrpoSlice> slice;
  int64_t pass = 0;
  bool first_of_generation = false;
  bool last_of_step = false;  // the optimizer step's last micro-batch (it logs time/update_s)
};

// One rank's GRPO stage. Generation batch per rank = train.micro_batch_size * train.grad_accum
// completions (whole groups of G), generated at the first micro-batch of every num_iterations-th
// step and handed out as grad_accum micro-batches per pass. Threading: one thread.
class GrpoStage : public train::TypedStage<GrpoMicroBatchData> {
 public:
  // `comm`: the data-parallel group (rewards are gathered over it so advantages see the global
  // batch). Loads the policy (model.path or model.config) and, when beta != 0, a frozen clone
  // (with model.lora: the policy with its adapters off, sharing the frozen base; with
  // grpo.reference_device=host: a copy in host memory). The reference log-probs of a generation
  // batch are computed right after it is generated and scored, before its first update (a step's
  // phases: time/generate_s, time/score_s, time/reference_s, time/update_s in metrics.jsonl).
  // `extra_rewards`: C++ reward sources grpo.reward_funcs may name (verifier names win).
  GrpoStage(GrpoRecipe& recipe, const std::string& run_dir, parallel::Comm comm = {},
            std::vector<RewardFunction> extra_rewards = {});
  ~GrpoStage() override;

  void set_rank(int rank, int world_size) override;
  optim::NamedTensors parameters() override;
  int64_t micro_batches_per_epoch() const override;
  // The next micro-batch of the generation batch (generating the next one when it is used up).
  GrpoMicroBatchData next_batch(int64_t* targets, int64_t* tokens) override;
  std::string cursor_json() const override;
  void restore_cursor(const std::string& json) override;
  train::LossOut batch_loss(const GrpoMicroBatchData& batch, double step_targets) override;
  void evaluate(Metrics* out) override;
  // final/ and checkpoints: the HF folder, or with model.lora the PEFT adapter folder (CAUSAL_LM);
  // after_final writes final-merged/ with model.lora.save_merged.
  void save_model(const std::string& dir) override;
  void after_final(const std::string& run_dir) override;
  double frozen_bytes() const override;

  // Greedy held-out accuracy on data.eval (grpo.eval_verifier), summed over ranks; fills
  // accuracy and completions/mean_length, and with grpo.eval_num_samples > 0 also
  // sampled_accuracy. Nothing when data.eval is empty.
  void evaluate_accuracy(Metrics* out);

  // For tests: pass 0 of a micro-batch of given completions, as a generation batch would make it,
  // without generating or scoring (prompts[i] and completions[i] token ids, advantages[i] its
  // advantage; sampler log-probs 0). Its tensors are on the policy's device.
  train::MicroBatch prepared_micro_batch(const std::vector<std::vector<int64_t>>& prompts,
                                         const std::vector<std::vector<int64_t>>& completions,
                                         const std::vector<double>& advantages);
  bool has_reference() const;
  // The reference's stored weights (with grpo.reference_device=host: the host copy, not a device one).
  optim::NamedTensors reference_parameters() const;
  // grpo.reference_device=host took effect (a full-fine-tuning reference kept in host memory).
  bool reference_on_host() const;
  // How many times the host reference was copied to the policy's device (once per reference pass:
  // each generation batch, each prepared_micro_batch); 0 when it lives on the device.
  int64_t reference_uploads() const;
  const model::Qwen2Model& policy() const;
  const GrpoLossInputs& last_loss_inputs() const;
  // The rollout engine's figures for the last generation call (tests: packed weights kept under LoRA).
  const rollout::Stats& last_rollout_stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The GRPO terms of the memory plan (`ptk plan` and run_grpo's check): the live reference (a copy
// only without LoRA), where it lives (grpo.reference_device), completion length and KV-cache slots.
void add_memory_plan(const GrpoRecipe& recipe, train::MemoryPlan* plan);

// Runs the whole stage and writes run_dir/final. Returns the run folder.
// Besides the run folder every stage writes, GRPO writes rollouts/step-N.jsonl (N: the first
// optimizer step trained on that generation batch; every grpo.log_rollouts_every-th batch). Rank 0
// writes step-N.jsonl, rank r > 0 step-N.rank-r.jsonl (its own slice of the global batch; ranks in
// order give the global batch). One line per completion, in generation order: G consecutive lines
// are one prompt's group. Fields: step, row (of the prepared data.train), prompt (decoded), completion
// (decoded, special tokens skipped), answer, rewards {source: value or null (none)}, reward (R =
// Σ_k w_k r_k over non-null terms; null when unscorable), advantage (over the global batch), length
// (completion tokens, up to and including the stop token), finish_reason (stop | length = truncated),
// prompt_length (prompt tokens), micro_batch (0 .. train.grad_accum-1: the micro-batch of this rank's
// step that holds it, after the shuffle; the same for every pass of grpo.num_iterations). The loss
// masks every completion token except, with grpo.mask_truncated_completions, truncated ones.
std::string run_grpo(GrpoRecipe& recipe, const std::string& recipe_file, const std::string& resolved_recipe);

}  // namespace ptk::rl
