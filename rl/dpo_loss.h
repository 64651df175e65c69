// DPO and SimPO/CPO losses and metrics as TRL defines them (docs/FORMULAS.md section 2), as pure functions
// of per-pair sequence log-probs: no model, no data, no process group. Not the DPO stage: the stage
// runs the fused log-prob op, gathers across processes and divides by K (accumulation).
//
// DPO: Rafailov et al. 2023, https://arxiv.org/abs/2305.18290 — matches trl/trainer/dpo_trainer.py
//   (`_compute_loss`, L1433-1578; metrics L1586-1653). IPO: https://arxiv.org/abs/2310.12036;
//   robust DPO: https://arxiv.org/abs/2403.00409; LD-DPO (ld_alpha): https://arxiv.org/abs/2409.06411.
// SimPO: Meng et al. 2024, https://arxiv.org/abs/2405.14734; CPO: https://arxiv.org/abs/2401.08417 —
//   matches trl/experimental/cpo/cpo_trainer.py (`cpo_loss`, `get_batch_loss_metrics`, L677-916).
// Thread-safety: pure functions; tensors in, tensors out.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace ptk::rl {

using NamedValues = std::vector<std::pair<std::string, double>>;  // metric name -> value, in log order

// ---------------------------------------------------------------------------------------------
// Sequence log-probs (what the stage builds from the fused op's per-token outputs)

// token_logps (R, T): per-target log-probs laid out per row (any padding value; it is masked);
// completion_mask (R, T): 1 on completion targets. Rows are B chosen then B rejected (R = 2B).
// Returns (R) sums s(y) = Σ_t c_t ℓ_t. With ld_alpha = α (LD-DPO): s = Σ_shared + α Σ_tail, the shared
// part being the first min(n⁺, n⁻) completion targets of the pair (counted along the mask).
// TRL (since its DPO refactor, PR #3906) mixes the policy's AND the reference's sums with ld_alpha, so
// the log-ratios compare the same weighted tokens (0 when policy == reference); the sft term alone
// keeps the plain token mean.
at::Tensor dpo_sequence_logps(const at::Tensor& token_logps, const at::Tensor& completion_mask,
                              std::optional<double> ld_alpha = std::nullopt);

// The vocabulary mean of the raw logits at each row, without forming (N, V): hidden (N, H) · mean_v W_v.
// hidden (N, H), lm_head (V, H) (every row, padding rows included, as HF's logits). Returns (N) float32,
// no gradient. Feeds logits/chosen and logits/rejected (sum it and count the rows).
at::Tensor dpo_vocab_mean_logits(const at::Tensor& hidden, const at::Tensor& lm_head);

// ---------------------------------------------------------------------------------------------
// DPO

enum class DpoLossType { kSigmoid, kHinge, kIpo, kRobust, kSft, kSigmoidNorm };

// "sigmoid" | "hinge" | "ipo" | "robust" | "sft" | "sigmoid_norm"; throws ptk::Error listing them.
DpoLossType dpo_loss_type_from_name(const std::string& name);
const char* dpo_loss_type_name(DpoLossType type);

struct DpoLossOptions {
  // One name or several; several are summed with loss_weights (TRL's list form).
  std::vector<std::string> loss_type{"sigmoid"};
  // One weight per loss_type; empty = all 1.0.
  std::vector<double> loss_weights;
  // KL strength: higher keeps the policy nearer the reference. TRL default 0.1.
  double beta = 0.1;
  // robust only: assumed label-noise rate, in [0, 0.5). Not used by sigmoid (TRL dropped cDPO).
  double label_smoothing = 0.0;
};

// Every problem with the options, each naming the field and its value; empty when valid.
std::vector<std::string> dpo_validate(const DpoLossOptions& options);

// One micro-batch of P pairs. All (P); log-probs are completion sums (dpo_sequence_logps).
struct DpoPairLogps {
  at::Tensor policy_chosen;    // (P) s_θ(y⁺) (LD-DPO mix with ld_alpha), differentiable
  at::Tensor policy_rejected;  // (P) s_θ(y⁻), differentiable
  at::Tensor ref_chosen;       // (P) s_ref(y⁺), no gradient (precomputed or computed live)
  at::Tensor ref_rejected;     // (P) s_ref(y⁻)
  at::Tensor chosen_tokens;    // (P) n⁺: completion-mask sums (ipo, sigmoid_norm, sft)
  at::Tensor rejected_tokens;  // (P) n⁻
  // (P) plain sums Σ_t c_t ℓ_t of the chosen replies, differentiable, for the sft term when
  // policy_chosen holds an LD-DPO mix; undefined = policy_chosen.
  at::Tensor policy_chosen_plain = at::Tensor();
};

struct DpoLossOutput {
  at::Tensor loss;              // scalar: Σ_k w_k · mean_pairs(L_k); the stage divides by K
  std::vector<at::Tensor> per_pair;  // one (P) per loss_type entry, unweighted (detached)
  at::Tensor chosen_rewards;    // (P) β ρ⁺ (detached)
  at::Tensor rejected_rewards;  // (P) β ρ⁻ (detached)
};

// Throws ptk::Error with every dpo_validate() problem, or on shape mismatches.
DpoLossOutput dpo_loss(const DpoPairLogps& pairs, const DpoLossOptions& options);

// ---------------------------------------------------------------------------------------------
// SimPO / CPO (no reference model)

enum class CpoLossType { kSigmoid, kHinge, kIpo, kSimpo };

// "sigmoid" | "hinge" | "ipo" | "simpo"; throws ptk::Error listing them.
CpoLossType cpo_loss_type_from_name(const std::string& name);

struct CpoLossOptions {
  std::string loss_type = "simpo";  // TRL's CPOConfig default is "sigmoid" (CPO); ptk names SimPO
  double beta = 0.1;                // SimPO paper uses 2.0-2.5 with length-normalized scores
  double simpo_gamma = 0.5;         // target reward margin γ (simpo only)
  double cpo_alpha = 1.0;           // weight of the chosen NLL; 1.0 = CPO-SimPO, 0.0 = pure SimPO
  double label_smoothing = 0.0;     // sigmoid/simpo: −(1−ε)logσ(βd) − ε logσ(−βd); in [0, 0.5)
};

std::vector<std::string> cpo_validate(const CpoLossOptions& options);

struct CpoPairLogps {
  at::Tensor policy_chosen;    // (P) summed completion log-probs, differentiable
  at::Tensor policy_rejected;  // (P)
  at::Tensor chosen_tokens;    // (P) n⁺ (length normalization for ipo/simpo, and the NLL)
  at::Tensor rejected_tokens;  // (P) n⁻
};

struct CpoLossOutput {
  at::Tensor loss;              // scalar: mean_pairs(L) + cpo_alpha · nll; the stage divides by K
  at::Tensor per_pair;          // (P) preference loss per pair (detached)
  at::Tensor nll;               // scalar: −Σ s_θ(y⁺) / Σ n⁺ (detached; TRL logs it as nll_loss)
  at::Tensor chosen_scores;     // (P) a⁺: mean log-prob (ipo, simpo) or sum (sigmoid, hinge), detached
  at::Tensor rejected_scores;   // (P) a⁻
  at::Tensor chosen_rewards;    // (P) β a⁺ (detached)
  at::Tensor rejected_rewards;  // (P) β a⁻
};

CpoLossOutput cpo_loss(const CpoPairLogps& pairs, const CpoLossOptions& options);

// ---------------------------------------------------------------------------------------------
// Metrics (TRL names). Sums over a micro-batch's pairs: with several processes, all-reduce (SUM)
// every field, then pair_metrics() gives TRL's gathered means.

struct PairMetricSums {
  double pairs = 0;
  double reward_chosen = 0;    // Σ chosen_rewards
  double reward_rejected = 0;  // Σ rejected_rewards
  double correct = 0;          // Σ 1[chosen_reward > rejected_reward] (strict: ties are wrong)
  double logp_chosen = 0;      // DPO: Σ s_θ(y⁺); CPO: Σ a⁺
  double logp_rejected = 0;
  // DPO: Σ over chosen completion targets of the vocab-mean logit, and the target count.
  // CPO: this process's mean of the whole chosen logits tensor (prompt and padding included), with
  // count 1, so the all-reduce gives TRL's mean over processes.
  double logits_chosen = 0, logits_chosen_count = 0;
  double logits_rejected = 0, logits_rejected_count = 0;
};

// rewards (P) detached, policy scores (P): DPO passes s_θ(y±), CPO passes a±. The logits fields are
// left for the caller (dpo_vocab_mean_logits).
PairMetricSums pair_metric_sums(const at::Tensor& chosen_rewards, const at::Tensor& rejected_rewards,
                                const at::Tensor& policy_chosen, const at::Tensor& policy_rejected);
void merge(PairMetricSums& into, const PairMetricSums& other);  // what an all-reduce SUM does

// rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected,
// logits/chosen, logits/rejected (NaN when no logits were counted).
NamedValues pair_metrics(const PairMetricSums& sums);

}  // namespace ptk::rl
