// GRPO as TRL defines it (docs/FORMULAS.md section 4), as pure tensor functions: rewards → advantages,
// the sampler/trainer importance-sampling weights, the per-token clipped objective with its
// aggregation and metrics. Not the GRPO stage: no model, no generation, no reward calls, no
// cross-process communication (each function says what the caller must gather or reduce).
//
// GRPO: Shao et al. 2024 (DeepSeekMath), https://arxiv.org/abs/2402.03300; DAPO (clip-higher, token
// mean): https://arxiv.org/abs/2503.14476; Dr. GRPO: https://arxiv.org/abs/2503.20783; GSPO (sequence
// ratio): https://arxiv.org/abs/2507.18071; two-sided clip (delta): INTELLECT-2,
// https://arxiv.org/abs/2505.07291; high-entropy tokens: https://arxiv.org/abs/2506.01939; CISPO:
// MiniMax-M1, https://arxiv.org/abs/2506.13585; SAPO: https://arxiv.org/abs/2511.20347; truncated IS:
// https://fengyao.notion.site/off-policy-rl. Matches trl/trainer/grpo_trainer.py
// (`_generate_and_score_completions` L1612-1703, L2416-2427, L2578-2623, L2676-2750;
// `_compute_loss` L2991-3260; `get_high_entropy_mask` L1396-1432) and trl/trainer/utils.py (nanstd).
// Thread-safety: pure functions.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace ptk::rl {

using NamedValues = std::vector<std::pair<std::string, double>>;  // metric name -> value, in log order

// ---------------------------------------------------------------------------------------------
// Rewards → advantages: once per generation batch, over the GLOBAL batch (gather rewards from every
// process first, so groups are complete), then each process keeps its slice of `advantages`.

struct GrpoAdvantageOptions {
  int64_t num_generations = 8;         // G: rows g*G .. g*G+G-1 are one prompt's group
  std::vector<double> reward_weights;  // (K) one per reward function; empty = all 1.0
  // group (default; TRL's True) | batch | none (TRL's False). Ignored by normalize_then_sum.
  std::string scale_rewards = "group";
  // sum_then_normalize (default) | normalize_then_sum (per-function group z-scores, then a batch z-score)
  std::string multi_objective_aggregation = "sum_then_normalize";
};

std::vector<std::string> grpo_validate(const GrpoAdvantageOptions& options);

struct GrpoAdvantages {
  at::Tensor advantages;  // (n) float64; NaN (unscorable rows, groups with < 2 scored members) → 0
  at::Tensor rewards;     // (n) float64 R = Σ_k w_k r_k over non-NaN terms; NaN when unscorable
  at::Tensor scale_std;   // (n) float64: the std that scales each row (group std for "none" too)
  // reward, reward_std, rewards/<f>/mean, rewards/<f>/std for each function, frac_reward_zero_std.
  NamedValues metrics;
};

// rewards_per_func (n, K): r_{i,k}, NaN where a function returned None; n a multiple of G.
// reward_names (K): the <f> of rewards/<f>/*; empty = "func0", "func1", ...
GrpoAdvantages grpo_advantages(const at::Tensor& rewards_per_func, const GrpoAdvantageOptions& options,
                               const std::vector<std::string>& reward_names = {});

// ---------------------------------------------------------------------------------------------
// Completions

// completion_ids (n, T) right-padded; completion_mask (n, T): the completion tokens up to and
// including the first EOS. Returns (n) bool: the last completion token is neither eos_id nor pad_id
// (an empty completion is not truncated). mask_truncated_completions: mask *= ~truncated[:, None].
at::Tensor grpo_truncated_completions(const at::Tensor& completion_ids, const at::Tensor& completion_mask,
                                      int64_t eos_id, int64_t pad_id);

// lengths (n): tokens up to and including EOS (tool tokens excluded), before truncation masking;
// truncated (n) bool. Over the gathered global batch. completions/mean_length, min_length,
// max_length, clipped_ratio, mean_terminated_length, min_terminated_length, max_terminated_length
// (0 when every completion is truncated).
NamedValues grpo_completion_metrics(const at::Tensor& lengths, const at::Tensor& truncated);

// ---------------------------------------------------------------------------------------------
// Importance sampling between the sampler's (rollout engine's) log-probs and the trainer's.

struct GrpoImportanceOptions {
  // token_truncate | token_mask | sequence_truncate | sequence_mask (default)
  std::string mode = "sequence_mask";
  std::optional<double> min;  // C_min; unset = no lower bound
  double max = 3.0;           // C_max (vllm_importance_sampling_clip_max)
};

std::vector<std::string> grpo_validate(const GrpoImportanceOptions& options);

struct GrpoImportanceWeights {
  at::Tensor weights;  // (B, T) token modes, (B, 1) sequence modes; no gradient
  // This process's values. Across processes TRL takes the mean of the per-process means and the
  // min/max of the minima/maxima.
  NamedValues metrics;  // sampling/sampling_logp_difference/{mean,max}, sampling/importance_sampling_ratio/{min,mean,max}
  std::function<NamedValues()> read_metrics;  // with read_metrics=false: computes `metrics` later (host reads then)
};

// old_logps (B, T): the trainer's log-probs at generation (ℓ^old); sampler_logps (B, T); mask (B, T).
// d = (ℓ^old − ℓ^sampler)·m; token: w = e^d; sequence: w = e^{Σ_t d}; truncate clamps to [C_min, C_max],
// mask zeroes weights outside it.
GrpoImportanceWeights grpo_importance_weights(const at::Tensor& old_logps, const at::Tensor& sampler_logps,
                                              const at::Tensor& mask, const GrpoImportanceOptions& options,
                                              bool read_metrics = true);

// ---------------------------------------------------------------------------------------------
// The per-token objective and its aggregation, one micro-batch.

struct GrpoLossOptions {
  // grpo | bnpo | dr_grpo | dapo (TRL default) | cispo | sapo. See FORMULAS 4.4 for what each
  // step minimizes; bnpo depends on the micro-batch size.
  std::string loss_type = "dapo";
  std::string importance_sampling_level = "token";  // token | sequence (GSPO: one ratio per completion)
  double beta = 0.0;                    // k3 KL weight; 0 = no reference model needed
  double epsilon = 0.2;                 // ε_low
  std::optional<double> epsilon_high;   // ε_high (DAPO 0.28; cispo: absolute cap, paper 5.0); unset = epsilon
  std::optional<double> delta;          // two-sided clip: r' = min(r, δ) (INTELLECT-2); unset = off
  bool use_bias_correction_kl = false;  // KL *= r
  double top_entropy_quantile = 1.0;    // ρ: keep the top-ρ entropy tokens in the policy term; 1 = off
  int64_t max_completion_length = 512;  // dr_grpo's constant normalizer
  double sapo_temperature_pos = 1.0;    // sapo τ for A > 0
  double sapo_temperature_neg = 1.05;   // sapo τ for A ≤ 0
};

std::vector<std::string> grpo_validate(const GrpoLossOptions& options);

// How the micro-batch loss is scaled (FORMULAS 4.4). TRL does the 1/K itself; DDP averages over P.
struct GrpoScaling {
  int64_t accumulation_steps = 1;  // K: current accumulation count (1 in eval); grpo, bnpo, dr_grpo, sapo
  int64_t num_processes = 1;       // P; dapo, cispo
  // N: active tokens (after truncation masking) of the whole generation batch, summed over
  // processes, at least 1; every micro-batch cut from it carries the same N. dapo, cispo.
  double num_items_in_batch = 0;
};

struct GrpoMicroBatch {
  at::Tensor logps;       // (B, T) policy ℓ (logits / temperature), differentiable
  at::Tensor old_logps;   // (B, T) ℓ^old; undefined = detached ℓ (μ = 1: ratio ≡ 1, gradient −A∇ℓ)
  at::Tensor ref_logps;   // (B, T) ℓ^ref; required iff beta != 0
  at::Tensor entropy;     // (B, T) H; required iff top_entropy_quantile < 1; optional otherwise (metric)
  at::Tensor mask;        // (B, T) loss mask m (completion × tool mask, truncation masking applied)
  at::Tensor advantages;  // (B)
  at::Tensor is_weights;  // (B, T) or (B, 1) from grpo_importance_weights; undefined = no correction
  // τ of the entropy mask, from the active entropies of ALL processes (grpo_entropy_threshold on
  // the gathered values). Unset = this micro-batch's own (right for one process).
  std::optional<double> entropy_threshold;
};

// This micro-batch's metric numerators. Across processes: SUM every *_sum and *_count field, MIN
// the *_min fields, MAX the *_max fields (NaN-ignoring); then grpo_loss_metrics().
struct GrpoLossMetricSums {
  double tokens = 0;       // Σ m
  double kl_sum = 0;       // Σ m·KL (beta != 0)
  double entropy_sum = 0;  // Σ m·H (entropy given)
  double clip_count = 0;   // Σ m (token level) or B (sequence level: each completion once, unmasked)
  double clip_low_sum = 0, clip_high_sum = 0, clip_region_sum = 0;
  double clip_low_min = 0, clip_high_max = 0;  // over completions of their own clip shares (NaN if none)
  double cispo_clip_sum = 0;  // cispo: Σ m·1[r > ε_high ∧ A > 0]
  bool has_kl = false, has_entropy = false, has_clip = false, has_cispo = false;
};
void merge(GrpoLossMetricSums& into, const GrpoLossMetricSums& other);

// kl, entropy, clip_ratio/low_mean, clip_ratio/low_min, clip_ratio/high_mean, clip_ratio/high_max,
// clip_ratio/region_mean (clip-based loss types), cispo_clip_ratio (cispo); only those that apply.
NamedValues grpo_loss_metrics(const GrpoLossMetricSums& sums);

struct GrpoLossOutput {
  at::Tensor loss;  // scalar, already scaled (÷K or ÷(N/P)): backward it as is
  GrpoLossMetricSums metrics;
  // With read_metrics=false: `metrics` is left empty and this computes it later from the detached
  // tensors it keeps (the host reads happen when it is called, e.g. after the step's backward).
  std::function<GrpoLossMetricSums()> read_metrics;
};

// Throws ptk::Error listing every grpo_validate() problem, a missing required input, or a shape mismatch.
// read_metrics=false: nothing is read back to the host here (except top_entropy_quantile < 1's
// threshold when batch.entropy_threshold is unset); see GrpoLossOutput::read_metrics.
GrpoLossOutput grpo_loss(const GrpoMicroBatch& batch, const GrpoLossOptions& options, const GrpoScaling& scaling,
                         bool read_metrics = true);

// τ = quantile(active_entropies, 1 − ρ) with linear interpolation in float32, as torch.quantile.
// active_entropies (M): H at every m = 1 token of the micro-batch, gathered over processes.
// M = 0 gives +inf (nothing kept).
double grpo_entropy_threshold(const at::Tensor& active_entropies, double top_entropy_quantile);
// The same τ from the (B, T) entropies and loss mask, computed where they are (a 0-dim float32
// tensor: no host read, for the loss on a GPU): nanquantile over the entropies with m = 0 set to NaN.
// No active token gives NaN, which keeps nothing, as +inf does.
at::Tensor grpo_entropy_threshold_tensor(const at::Tensor& entropy, const at::Tensor& mask, double top_entropy_quantile);

}  // namespace ptk::rl
