#include "rl/grpo_loss.h"

#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "core/util/error.h"    // PTK_CHECK, ptk::Error
#include "core/util/strings.h"  // nearest

namespace ptk::rl {
namespace {

constexpr double kStdEps = 1e-4;  // TRL adds it to every std it divides by

enum class LossType { kGrpo, kBnpo, kDrGrpo, kDapo, kCispo, kSapo };
enum class IsMode { kTokenTruncate, kTokenMask, kSequenceTruncate, kSequenceMask };

template <class E>
std::optional<E> lookup(const std::string& name, const std::vector<std::pair<std::string, E>>& table) {
  for (auto& [n, e] : table)
    if (n == name) return e;
  return std::nullopt;
}

template <class E>
std::string not_one_of(const char* what, const std::string& name, const std::vector<std::pair<std::string, E>>& table) {
  std::vector<std::string> names;
  std::string valid;
  for (auto& [n, e] : table) {
    names.push_back(n);
    valid += (valid.empty() ? "" : ", ") + n;
  }
  std::string hint = nearest(name, names);
  return std::string(what) + " '" + name + "' is not one of: " + valid +
         (hint.empty() ? "" : " (did you mean '" + hint + "'?)");
}

template <class E>
E parse_name(const char* what, const std::string& name, const std::vector<std::pair<std::string, E>>& table) {
  if (auto e = lookup(name, table)) return *e;
  throw Error(not_one_of(what, name, table));
}

const std::vector<std::pair<std::string, LossType>> kLossTypes = {
    {"grpo", LossType::kGrpo},   {"bnpo", LossType::kBnpo},   {"dr_grpo", LossType::kDrGrpo},
    {"dapo", LossType::kDapo},   {"cispo", LossType::kCispo}, {"sapo", LossType::kSapo}};
const std::vector<std::pair<std::string, bool>> kLevels = {{"token", true}, {"sequence", false}};
const std::vector<std::pair<std::string, IsMode>> kIsModes = {{"token_truncate", IsMode::kTokenTruncate},
                                                              {"token_mask", IsMode::kTokenMask},
                                                              {"sequence_truncate", IsMode::kSequenceTruncate},
                                                              {"sequence_mask", IsMode::kSequenceMask}};
const std::vector<std::pair<std::string, int>> kScaleRewards = {{"group", 0}, {"batch", 1}, {"none", 2}};
const std::vector<std::pair<std::string, bool>> kAggregations = {{"sum_then_normalize", true},
                                                                 {"normalize_then_sum", false}};

void throw_if(const std::vector<std::string>& errors, const char* where) {
  if (errors.empty()) return;
  std::string msg = std::string(where) + ": " + std::to_string(errors.size()) + " invalid option(s):";
  for (auto& e : errors) msg += "\n  - " + e;
  throw Error(msg);
}

std::string num(double v) { return c10::str(v); }

// NaN-ignoring mean and unbiased std along `dim` (keepdim), as trl/trainer/utils.py nanstd:
// NaN when fewer than 2 values (std) or none (mean).
at::Tensor nanmean(const at::Tensor& x, int64_t dim) {
  at::Tensor count = x.isnan().logical_not().sum(dim, true).to(x.scalar_type());
  return x.nan_to_num(0.0, 0.0, 0.0).sum(dim, true) / count;
}
at::Tensor nanstd(const at::Tensor& x, int64_t dim) {
  at::Tensor count = x.isnan().logical_not().sum(dim, true).to(x.scalar_type());
  at::Tensor var = nanmean((x - nanmean(x, dim)).pow(2), dim) * count / (count - 1);
  return var.sqrt();
}
// Σ over `dim` skipping NaN terms; NaN where every term is NaN.
at::Tensor nansum_or_nan(const at::Tensor& x, int64_t dim) {
  at::Tensor any = x.isnan().logical_not().any(dim);
  return at::where(any, x.nan_to_num(0.0, 0.0, 0.0).sum(dim), std::nan(""));
}
double item(const at::Tensor& t) { return t.item<double>(); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// Advantages

std::vector<std::string> grpo_validate(const GrpoAdvantageOptions& o) {
  std::vector<std::string> errors;
  if (o.num_generations < 1) errors.push_back("num_generations = " + std::to_string(o.num_generations) + " must be >= 1");
  if (!lookup(o.scale_rewards, kScaleRewards)) errors.push_back(not_one_of("scale_rewards", o.scale_rewards, kScaleRewards));
  if (!lookup(o.multi_objective_aggregation, kAggregations))
    errors.push_back(not_one_of("multi_objective_aggregation", o.multi_objective_aggregation, kAggregations));
  return errors;
}

GrpoAdvantages grpo_advantages(const at::Tensor& rewards_per_func, const GrpoAdvantageOptions& o,
                               const std::vector<std::string>& reward_names) {
  throw_if(grpo_validate(o), "grpo_advantages");
  PTK_CHECK(rewards_per_func.dim() == 2, "grpo_advantages: rewards_per_func must be (n, K), got " +
                                             c10::str(rewards_per_func.sizes()));
  torch::NoGradGuard no_grad;
  const at::Tensor r = rewards_per_func.to(torch::kCPU, torch::kFloat64);  // (n, K)
  const int64_t n = r.size(0), K = r.size(1), G = o.num_generations;
  PTK_CHECK(n % G == 0, "grpo_advantages: " + std::to_string(n) + " completions is not a whole number of groups of G = " +
                            std::to_string(G) + "; gather every process's rewards first");
  PTK_CHECK(o.reward_weights.empty() || static_cast<int64_t>(o.reward_weights.size()) == K,
            "grpo_advantages: reward_weights has " + std::to_string(o.reward_weights.size()) + " entries for " +
                std::to_string(K) + " reward functions; give one per function or none");
  PTK_CHECK(reward_names.empty() || static_cast<int64_t>(reward_names.size()) == K,
            "grpo_advantages: " + std::to_string(reward_names.size()) + " reward_names for " + std::to_string(K) +
                " reward functions");
  at::Tensor w = o.reward_weights.empty() ? torch::ones({K}, torch::kFloat64)
                                          : torch::tensor(o.reward_weights, torch::kFloat64);  // (K)
  at::Tensor weighted = nansum_or_nan(r * w, 1);  // (n) R, the logged reward

  GrpoAdvantages out;
  out.rewards = weighted;
  at::Tensor adv, scale_std;  // (n)
  if (*lookup(o.multi_objective_aggregation, kAggregations)) {  // sum_then_normalize
    at::Tensor grouped = weighted.view({-1, G});                          // (n/G, G)
    at::Tensor mean = nanmean(grouped, 1).expand({-1, G}).reshape({n});    // (n)
    at::Tensor std_group = nanstd(grouped, 1).expand({-1, G}).reshape({n});
    const int mode = *lookup(o.scale_rewards, kScaleRewards);
    adv = weighted - mean;
    if (mode == 1) {  // batch: group mean, whole-batch std
      scale_std = nanstd(weighted, 0).expand({n});
      adv = adv / (scale_std + kStdEps);
    } else {
      scale_std = std_group;
      if (mode == 0) adv = adv / (scale_std + kStdEps);
    }
  } else {  // normalize_then_sum: per function and group z-scores, weighted sum, whole-batch z-score
    at::Tensor grouped = r.view({-1, G, K});
    at::Tensor z = (grouped - nanmean(grouped, 1)) / (nanstd(grouped, 1) + kStdEps);  // (n/G, G, K)
    at::Tensor summed = nansum_or_nan(z.reshape({n, K}) * w, 1);                       // (n)
    scale_std = nanstd(summed, 0).expand({n});
    adv = (summed - nanmean(summed, 0)) / (scale_std + kStdEps);
  }
  out.advantages = adv.nan_to_num(0.0, 0.0, 0.0).contiguous();
  out.scale_std = scale_std.contiguous();

  for (int64_t k = 0; k < K; ++k) {
    const std::string f = reward_names.empty() ? "func" + std::to_string(k) : reward_names[k];
    at::Tensor col = r.select(1, k);
    out.metrics.emplace_back("rewards/" + f + "/mean", item(nanmean(col, 0)));
    out.metrics.emplace_back("rewards/" + f + "/std", item(nanstd(col, 0)));
  }
  out.metrics.emplace_back("reward", item(nanmean(weighted, 0)));
  out.metrics.emplace_back("reward_std", item(nanstd(weighted, 0)));
  // torch.isclose(std, 0): |std| <= 1e-8; a NaN std is not zero.
  out.metrics.emplace_back("frac_reward_zero_std", item(scale_std.abs().le(1e-8).to(torch::kFloat64).mean()));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Completions

at::Tensor grpo_truncated_completions(const at::Tensor& completion_ids, const at::Tensor& completion_mask,
                                      int64_t eos_id, int64_t pad_id) {
  PTK_CHECK(completion_ids.dim() == 2 && completion_ids.sizes() == completion_mask.sizes(),
            "grpo_truncated_completions: completion_ids and completion_mask must both be (n, T), got " +
                c10::str(completion_ids.sizes()) + " and " + c10::str(completion_mask.sizes()));
  torch::NoGradGuard no_grad;
  const int64_t T = completion_ids.size(1);
  at::Tensor pos = torch::arange(T, completion_ids.options().dtype(torch::kInt64)).expand_as(completion_ids);
  at::Tensor last = at::where(completion_mask.ne(0), pos, -1).amax(1);                  // (n), -1 if empty
  at::Tensor tok = completion_ids.to(torch::kInt64).gather(1, last.clamp_min(0).unsqueeze(1)).squeeze(1);  // (n)
  return last.ge(0) & tok.ne(eos_id) & tok.ne(pad_id);
}

NamedValues grpo_completion_metrics(const at::Tensor& lengths, const at::Tensor& truncated) {
  PTK_CHECK(lengths.dim() == 1 && truncated.dim() == 1 && lengths.size(0) == truncated.size(0) && lengths.size(0) > 0,
            "grpo_completion_metrics: lengths (n) and truncated (n), n > 0, expected, got " + c10::str(lengths.sizes()) +
                " and " + c10::str(truncated.sizes()));
  at::Tensor len = lengths.to(torch::kCPU, torch::kFloat64);
  at::Tensor trunc = truncated.to(torch::kCPU, torch::kBool);
  at::Tensor term = len.masked_select(trunc.logical_not());
  const bool any = term.numel() > 0;
  return {{"completions/mean_length", item(len.mean())},
          {"completions/min_length", item(len.min())},
          {"completions/max_length", item(len.max())},
          {"completions/clipped_ratio", item(trunc.to(torch::kFloat64).mean())},
          {"completions/mean_terminated_length", any ? item(term.mean()) : 0.0},
          {"completions/min_terminated_length", any ? item(term.min()) : 0.0},
          {"completions/max_terminated_length", any ? item(term.max()) : 0.0}};
}

// ---------------------------------------------------------------------------------------------
// Importance sampling

std::vector<std::string> grpo_validate(const GrpoImportanceOptions& o) {
  std::vector<std::string> errors;
  if (!lookup(o.mode, kIsModes)) errors.push_back(not_one_of("vllm_importance_sampling_mode", o.mode, kIsModes));
  if (!(o.max > 0)) errors.push_back("vllm_importance_sampling_clip_max = " + num(o.max) + " must be > 0");
  if (o.min && !(*o.min <= o.max))
    errors.push_back("vllm_importance_sampling_clip_min = " + num(*o.min) + " must be <= clip_max = " + num(o.max));
  return errors;
}

GrpoImportanceWeights grpo_importance_weights(const at::Tensor& old_logps, const at::Tensor& sampler_logps,
                                              const at::Tensor& mask, const GrpoImportanceOptions& o, bool read_metrics) {
  throw_if(grpo_validate(o), "grpo_importance_weights");
  PTK_CHECK(old_logps.dim() == 2 && old_logps.sizes() == sampler_logps.sizes() && old_logps.sizes() == mask.sizes(),
            "grpo_importance_weights: old_logps, sampler_logps and mask must all be (B, T), got " +
                c10::str(old_logps.sizes()) + ", " + c10::str(sampler_logps.sizes()) + ", " + c10::str(mask.sizes()));
  torch::NoGradGuard no_grad;
  const IsMode mode = *lookup(o.mode, kIsModes);
  const bool token = mode == IsMode::kTokenTruncate || mode == IsMode::kTokenMask;
  const bool truncate = mode == IsMode::kTokenTruncate || mode == IsMode::kSequenceTruncate;
  at::Tensor m = mask.to(old_logps.scalar_type());
  at::Tensor diff = (old_logps.detach() - sampler_logps.to(old_logps.scalar_type())) * m;  // (B, T) d
  at::Tensor w = token ? diff.exp() : diff.sum(1, true).exp();                                // (B, T) | (B, 1)
  const double lo = o.min.value_or(-std::numeric_limits<double>::infinity());
  if (truncate) {
    w = o.min ? w.clamp(*o.min, o.max) : w.clamp_max(o.max);
  } else {
    w = w * (w.ge(lo) & w.le(o.max)).to(w.scalar_type());
  }
  GrpoImportanceWeights out;
  out.weights = w;
  auto metrics = [m, diff, w, token]() -> NamedValues {
    torch::NoGradGuard no_grad;
    at::Tensor active = m.ne(0);
    at::Tensor abs_diff = diff.abs().masked_select(active);  // (M)
    at::Tensor flat = token ? w.masked_select(active) : w.reshape({-1});
    const double nan = std::nan("");
    auto stat = [&](const at::Tensor& t, int which) {
      if (t.numel() == 0) return nan;
      return item(which == 0 ? t.min() : which == 1 ? t.to(torch::kFloat64).mean() : t.max());
    };
    return {{"sampling/sampling_logp_difference/mean", stat(abs_diff, 1)},
            {"sampling/sampling_logp_difference/max", stat(abs_diff, 2)},
            {"sampling/importance_sampling_ratio/min", stat(flat, 0)},
            {"sampling/importance_sampling_ratio/mean", stat(flat, 1)},
            {"sampling/importance_sampling_ratio/max", stat(flat, 2)}};
  };
  if (read_metrics) out.metrics = metrics();
  else out.read_metrics = metrics;
  return out;
}

// ---------------------------------------------------------------------------------------------
// Loss

std::vector<std::string> grpo_validate(const GrpoLossOptions& o) {
  std::vector<std::string> errors;
  if (!lookup(o.loss_type, kLossTypes)) errors.push_back(not_one_of("loss_type", o.loss_type, kLossTypes));
  if (!lookup(o.importance_sampling_level, kLevels))
    errors.push_back(not_one_of("importance_sampling_level", o.importance_sampling_level, kLevels));
  if (!(o.beta >= 0)) errors.push_back("beta = " + num(o.beta) + " must be >= 0");
  if (!(o.epsilon >= 0 && o.epsilon < 1)) errors.push_back("epsilon = " + num(o.epsilon) + " must be in [0, 1)");
  if (o.epsilon_high && !(*o.epsilon_high >= 0)) errors.push_back("epsilon_high = " + num(*o.epsilon_high) + " must be >= 0");
  if (o.delta && !(*o.delta > 0)) errors.push_back("delta = " + num(*o.delta) + " must be > 0 (TRL suggests > 1 + epsilon_high)");
  if (!(o.top_entropy_quantile > 0 && o.top_entropy_quantile <= 1))
    errors.push_back("top_entropy_quantile = " + num(o.top_entropy_quantile) + " must be in (0, 1]");
  if (o.max_completion_length < 1)
    errors.push_back("max_completion_length = " + std::to_string(o.max_completion_length) + " must be >= 1");
  if (!(o.sapo_temperature_pos > 0 && o.sapo_temperature_neg > 0))
    errors.push_back("sapo_temperature_pos/neg = " + num(o.sapo_temperature_pos) + "/" + num(o.sapo_temperature_neg) +
                     " must be > 0");
  return errors;
}

double grpo_entropy_threshold(const at::Tensor& active_entropies, double rho) {
  PTK_CHECK(rho > 0 && rho <= 1, "grpo_entropy_threshold: top_entropy_quantile = " + num(rho) + " must be in (0, 1]");
  if (active_entropies.numel() == 0) return std::numeric_limits<double>::infinity();
  torch::NoGradGuard no_grad;
  return item(torch::quantile(active_entropies.detach().reshape({-1}).to(torch::kFloat32), 1.0 - rho));
}

at::Tensor grpo_entropy_threshold_tensor(const at::Tensor& entropy, const at::Tensor& mask, double rho) {
  PTK_CHECK(rho > 0 && rho <= 1, "grpo_entropy_threshold: top_entropy_quantile = " + num(rho) + " must be in (0, 1]");
  torch::NoGradGuard no_grad;
  auto e = entropy.detach().to(torch::kFloat32).masked_fill(mask.eq(0), std::numeric_limits<float>::quiet_NaN());
  return torch::nanquantile(e.reshape({-1}), 1.0 - rho);
}

GrpoLossOutput grpo_loss(const GrpoMicroBatch& b, const GrpoLossOptions& o, const GrpoScaling& s, bool read_metrics) {
  throw_if(grpo_validate(o), "grpo_loss");
  PTK_CHECK(b.logps.defined() && b.logps.dim() == 2, "grpo_loss: logps must be (B, T)");
  const int64_t B = b.logps.size(0);
  auto check_bt = [&](const at::Tensor& t, const char* name) {
    PTK_CHECK(t.sizes() == b.logps.sizes(),
              std::string("grpo_loss: ") + name + " must be (B, T) = " + c10::str(b.logps.sizes()) + ", got " +
                  c10::str(t.sizes()));
  };
  PTK_CHECK(b.mask.defined(), "grpo_loss: mask is required");
  check_bt(b.mask, "mask");
  PTK_CHECK(b.advantages.defined() && b.advantages.dim() == 1 && b.advantages.size(0) == B,
            "grpo_loss: advantages must be (B) = (" + std::to_string(B) + ")");
  if (b.old_logps.defined()) check_bt(b.old_logps, "old_logps");
  PTK_CHECK(o.beta == 0 || b.ref_logps.defined(),
            "grpo_loss: beta = " + num(o.beta) + " needs ref_logps; set beta 0 to train without a reference");
  if (b.ref_logps.defined()) check_bt(b.ref_logps, "ref_logps");
  PTK_CHECK(o.top_entropy_quantile >= 1 || b.entropy.defined(),
            "grpo_loss: top_entropy_quantile = " + num(o.top_entropy_quantile) + " needs entropy");
  if (b.entropy.defined()) check_bt(b.entropy, "entropy");
  if (b.is_weights.defined())
    PTK_CHECK(b.is_weights.dim() == 2 && b.is_weights.size(0) == B &&
                  (b.is_weights.size(1) == 1 || b.is_weights.size(1) == b.logps.size(1)),
              "grpo_loss: is_weights must be (B, T) or (B, 1), got " + c10::str(b.is_weights.sizes()));
  PTK_CHECK(s.accumulation_steps >= 1 && s.num_processes >= 1,
            "grpo_loss: accumulation_steps and num_processes must be >= 1");
  const LossType type = *lookup(o.loss_type, kLossTypes);
  const bool token_level = *lookup(o.importance_sampling_level, kLevels);
  PTK_CHECK((type != LossType::kDapo && type != LossType::kCispo) || s.num_items_in_batch >= 1,
            "grpo_loss: loss_type " + o.loss_type + " needs num_items_in_batch (N, the generation batch's active "
            "tokens over all processes) >= 1, got " + num(s.num_items_in_batch));

  const auto dt = b.logps.scalar_type();
  const at::Tensor& lp = b.logps;                                            // (B, T)
  at::Tensor m = b.mask.to(dt);                                              // (B, T)
  at::Tensor old = b.old_logps.defined() ? b.old_logps.to(dt).detach() : lp.detach();
  at::Tensor lam = lp - old;                                                 // (B, T) λ
  at::Tensor log_ratio = token_level ? lam : (lam * m).sum(1, true) / m.sum(1, true).clamp_min(1.0);  // (B,T)|(B,1)
  at::Tensor r = log_ratio.exp();                                            // (B, T) | (B, 1)
  at::Tensor A = b.advantages.to(dt).unsqueeze(1);                           // (B, 1)
  const double eps_low = o.epsilon, eps_high = o.epsilon_high.value_or(o.epsilon);
  const bool clip_family = type != LossType::kCispo && type != LossType::kSapo;

  at::Tensor p;        // (B, T) | (B, 1) per-token policy loss
  at::Tensor r_clamp;  // r' (after delta), for the clip metrics
  if (clip_family) {
    at::Tensor c = r.clamp(1.0 - eps_low, 1.0 + eps_high);
    r_clamp = o.delta ? r.clamp_max(*o.delta) : r;
    p = -at::minimum(r_clamp * A, c * A);
  } else if (type == LossType::kCispo) {
    p = -r.clamp_max(eps_high).detach() * A * lp;
  } else {  // sapo
    at::Tensor tau = at::where(A > 0, o.sapo_temperature_pos, o.sapo_temperature_neg).to(dt);  // (B, 1)
    p = -(at::sigmoid(tau * (r - 1.0)) * 4.0 / tau) * A;
  }
  if (o.top_entropy_quantile < 1.0) {
    at::Tensor keep;  // (B, T)
    if (b.entropy_threshold || b.entropy.is_cpu()) {
      const double tau = b.entropy_threshold ? *b.entropy_threshold
                                             : grpo_entropy_threshold(b.entropy.masked_select(m.ne(0)),
                                                                      o.top_entropy_quantile);
      keep = (b.entropy.detach().to(dt) * m).ge(tau) & m.ne(0);
    } else {  // on a device: τ stays there (reading it back would synchronise inside the step)
      const at::Tensor tau = grpo_entropy_threshold_tensor(b.entropy, m, o.top_entropy_quantile);
      keep = (b.entropy.detach().to(dt) * m).ge(tau.to(dt)) & m.ne(0);
    }
    p = p * keep.to(dt);
  }
  if (b.is_weights.defined()) p = p * b.is_weights.detach().to(dt);
  at::Tensor kl;  // (B, T)
  if (o.beta != 0) {
    at::Tensor d = b.ref_logps.to(dt).detach() - lp;
    kl = d.exp() - d - 1.0;
    if (o.use_bias_correction_kl) kl = kl * r;
    p = p + o.beta * kl;
  }

  at::Tensor mp = p * m;  // (B, T)
  const double K = static_cast<double>(s.accumulation_steps);
  GrpoLossOutput out;
  switch (type) {
    case LossType::kGrpo:
    case LossType::kSapo: out.loss = (mp.sum(1) / m.sum(1).clamp_min(1.0)).mean() / K; break;
    case LossType::kBnpo: out.loss = mp.sum() / m.sum().clamp_min(1.0) / K; break;
    case LossType::kDrGrpo:
      out.loss = mp.sum() / static_cast<double>(B * o.max_completion_length) / K;
      break;
    case LossType::kDapo:
    case LossType::kCispo:
      out.loss = mp.sum() / (s.num_items_in_batch / static_cast<double>(s.num_processes));
      break;
  }

  // Metrics (no gradient), from detached tensors: now, or when out.read_metrics is called.
  auto metrics = [dt, token_level, clip_family, type, B, eps_low, eps_high, m = m.detach(),
                  kl = kl.defined() ? kl.detach() : at::Tensor(), entropy = b.entropy.defined() ? b.entropy.detach() : at::Tensor(),
                  r_clamp = r_clamp.defined() ? r_clamp.detach() : at::Tensor(), r = r.detach(), A = A.detach()]() {
    torch::NoGradGuard no_grad;
    GrpoLossMetricSums ms;
    ms.tokens = item(m.sum());
    if (kl.defined()) {
      ms.has_kl = true;
      ms.kl_sum = item((kl * m).sum());
    }
    if (entropy.defined()) {
      ms.has_entropy = true;
      ms.entropy_sum = item((entropy.to(dt) * m).sum());
    }
    // Sums of an indicator as gmean counts it (token: masked tokens; sequence: each completion once),
    // plus the per-completion shares for low_min / high_max.
    auto indicator_sum = [&](const at::Tensor& x) {
      at::Tensor xf = x.to(dt);
      return token_level ? item((xf * m).sum()) : item(xf.sum());
    };
    auto per_completion = [&](const at::Tensor& x) {  // (B), NaN where a completion has no active token
      at::Tensor xf = x.to(dt);
      return token_level ? (xf * m).sum(1) / m.sum(1) : xf.squeeze(1);
    };
    const double nan = std::nan("");
    auto nan_reduce = [&](const at::Tensor& v, bool is_min) {
      at::Tensor ok = v.masked_select(v.isnan().logical_not());
      return ok.numel() == 0 ? nan : item(is_min ? ok.min() : ok.max());
    };
    ms.clip_count = token_level ? ms.tokens : static_cast<double>(B);
    if (clip_family) {
      ms.has_clip = true;
      at::Tensor low = r_clamp.lt(1.0 - eps_low) & A.lt(0);
      at::Tensor high = r_clamp.gt(1.0 + eps_high) & A.gt(0);
      ms.clip_low_sum = indicator_sum(low);
      ms.clip_high_sum = indicator_sum(high);
      ms.clip_region_sum = indicator_sum(low | high);
      ms.clip_low_min = nan_reduce(per_completion(low), true);
      ms.clip_high_max = nan_reduce(per_completion(high), false);
    } else {
      ms.clip_low_min = ms.clip_high_max = nan;
    }
    if (type == LossType::kCispo) {
      ms.has_cispo = true;
      ms.cispo_clip_sum = indicator_sum(r.gt(eps_high) & A.gt(0));
    }
    return ms;
  };
  if (read_metrics) out.metrics = metrics();
  else out.read_metrics = metrics;
  return out;
}

void merge(GrpoLossMetricSums& a, const GrpoLossMetricSums& b) {
  a.tokens += b.tokens;
  a.kl_sum += b.kl_sum;
  a.entropy_sum += b.entropy_sum;
  a.clip_count += b.clip_count;
  a.clip_low_sum += b.clip_low_sum;
  a.clip_high_sum += b.clip_high_sum;
  a.clip_region_sum += b.clip_region_sum;
  a.clip_low_min = std::fmin(a.clip_low_min, b.clip_low_min);  // fmin/fmax ignore a NaN operand
  a.clip_high_max = std::fmax(a.clip_high_max, b.clip_high_max);
  a.cispo_clip_sum += b.cispo_clip_sum;
  a.has_kl |= b.has_kl;
  a.has_entropy |= b.has_entropy;
  a.has_clip |= b.has_clip;
  a.has_cispo |= b.has_cispo;
}

NamedValues grpo_loss_metrics(const GrpoLossMetricSums& s) {
  const double nan = std::nan("");
  auto div = [nan](double a, double c) { return c > 0 ? a / c : nan; };
  NamedValues v;
  if (s.has_kl) v.emplace_back("kl", div(s.kl_sum, s.tokens));
  if (s.has_entropy) v.emplace_back("entropy", div(s.entropy_sum, s.tokens));
  if (s.has_clip) {
    v.emplace_back("clip_ratio/low_mean", div(s.clip_low_sum, s.clip_count));
    v.emplace_back("clip_ratio/low_min", s.clip_low_min);
    v.emplace_back("clip_ratio/high_mean", div(s.clip_high_sum, s.clip_count));
    v.emplace_back("clip_ratio/high_max", s.clip_high_max);
    v.emplace_back("clip_ratio/region_mean", div(s.clip_region_sum, s.clip_count));
  }
  if (s.has_cispo) v.emplace_back("cispo_clip_ratio", div(s.cispo_clip_sum, s.clip_count));
  return v;
}

}  // namespace ptk::rl
