// Reward-model (Bradley–Terry) loss and metrics as TRL defines them (docs/FORMULAS.md section 3), as pure
// functions of the scores: no model, no score head, no data. Not the RM stage: the stage pools the
// head output, gathers across processes and divides by K (accumulation).
//
// Bradley–Terry preference loss, as in InstructGPT (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155);
// margin: Llama 2 (https://arxiv.org/abs/2307.09288); reward centering: Eisenstein et al. 2023
// (https://arxiv.org/abs/2312.09244). Matches trl/trainer/reward_trainer.py (`compute_loss`, L749-776).
// Thread-safety: pure functions.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace ptk::reward {

struct RmLossOptions {
  // Weight of mean((r⁺ + r⁻)²), pulling scores toward mean 0; unset = no term (TRL's None). TRL
  // recommends 0.01.
  std::optional<double> center_rewards_coefficient;
};

struct RmLossOutput {
  at::Tensor loss;         // scalar: mean −logσ(r⁺ − r⁻ − m) + c · mean (r⁺ + r⁻)²; the stage divides by K
  at::Tensor bt_loss;      // scalar: the Bradley–Terry part (detached)
  at::Tensor center_term;  // scalar: c · mean (r⁺ + r⁻)², 0 when unset (detached)
};

// chosen (P), rejected (P): scores r⁺, r⁻ (differentiable); margin (P): the dataset's margin column,
// undefined = 0.
RmLossOutput rm_loss(const at::Tensor& chosen, const at::Tensor& rejected, const at::Tensor& margin,
                     const RmLossOptions& options);

// One process's metric values for a micro-batch. Across processes TRL takes min/mean/max over ALL
// gathered scores (reduce reward_min with MIN, reward_max with MAX, sum reward_sum and reward_count)
// and the MEAN over processes of the local accuracy and margin (sum them and `processes`).
struct RmMetricSums {
  double reward_min = 0, reward_max = 0, reward_sum = 0, reward_count = 0;  // chosen and rejected together
  double accuracy = 0;   // local mean 1[r⁺ > r⁻] (strict: ties are wrong); summed over processes
  double margin = 0;     // local mean (r⁺ − r⁻), dataset margin not subtracted; summed over processes
  double processes = 0;  // 1 per process
};

RmMetricSums rm_metric_sums(const at::Tensor& chosen, const at::Tensor& rejected);
void merge(RmMetricSums& into, const RmMetricSums& other);  // what the cross-process reductions do

// min_reward, mean_reward, max_reward, accuracy, margin.
std::vector<std::pair<std::string, double>> rm_metrics(const RmMetricSums& sums);

}  // namespace ptk::reward
