#include "rl/dpo_loss.h"

#include <torch/torch.h>

#include <cmath>

#include "core/util/error.h"    // PTK_CHECK, ptk::Error
#include "core/util/strings.h"  // nearest

namespace ptk::rl {
namespace {

namespace F = torch::nn::functional;

template <class E>
E parse_name(const char* what, const std::string& name, const std::vector<std::pair<std::string, E>>& table) {
  std::vector<std::string> names;
  for (auto& [n, e] : table) {
    if (n == name) return e;
    names.push_back(n);
  }
  std::string valid;
  for (auto& n : names) valid += (valid.empty() ? "" : ", ") + n;
  std::string hint = nearest(name, names);
  throw Error(std::string(what) + " '" + name + "' is not one of: " + valid +
              (hint.empty() ? "" : " (did you mean '" + hint + "'?)"));
}

void throw_if(const std::vector<std::string>& errors, const char* where) {
  if (errors.empty()) return;
  std::string msg = std::string(where) + ": " + std::to_string(errors.size()) + " invalid option(s):";
  for (auto& e : errors) msg += "\n  - " + e;
  throw Error(msg);
}

void check_pairs(const at::Tensor& t, const char* name, int64_t P, const char* where) {
  PTK_CHECK(t.defined(), std::string(where) + ": " + name + " is required");
  PTK_CHECK(t.dim() == 1 && t.size(0) == P, std::string(where) + ": " + name + " must be (P) = (" +
                                                std::to_string(P) + "), got " + c10::str(t.sizes()));
}

// −logσ(x), stable.
at::Tensor neg_logsigmoid(const at::Tensor& x) { return F::softplus(-x); }

const std::vector<std::pair<std::string, DpoLossType>>& dpo_table() {
  static const std::vector<std::pair<std::string, DpoLossType>> t = {
      {"sigmoid", DpoLossType::kSigmoid}, {"hinge", DpoLossType::kHinge},
      {"ipo", DpoLossType::kIpo},         {"robust", DpoLossType::kRobust},
      {"sft", DpoLossType::kSft},         {"sigmoid_norm", DpoLossType::kSigmoidNorm}};
  return t;
}

}  // namespace

at::Tensor dpo_sequence_logps(const at::Tensor& token_logps, const at::Tensor& completion_mask,
                              std::optional<double> ld_alpha) {
  PTK_CHECK(token_logps.dim() == 2 && token_logps.sizes() == completion_mask.sizes(),
            "dpo_sequence_logps: token_logps and completion_mask must both be (R, T), got " +
                c10::str(token_logps.sizes()) + " and " + c10::str(completion_mask.sizes()));
  at::Tensor m = completion_mask.to(token_logps.scalar_type());  // (R, T)
  at::Tensor lp = token_logps.masked_fill(m.eq(0), 0.0);        // padding values (even -inf) drop out
  if (!ld_alpha) return lp.sum(1);
  const int64_t R = lp.size(0);
  PTK_CHECK(R % 2 == 0, "dpo_sequence_logps: ld_alpha needs B chosen rows then B rejected rows (R even), got R = " +
                            std::to_string(R));
  at::Tensor n = m.sum(1);                                                     // (R)
  at::Tensor shared = at::minimum(n.slice(0, 0, R / 2), n.slice(0, R / 2));     // (B)
  shared = at::cat({shared, shared}).unsqueeze(1);                             // (R, 1)
  at::Tensor front = (m.cumsum(1) <= shared).to(lp.scalar_type()) * m;         // (R, T) first l_p targets
  at::Tensor front_sum = (lp * front).sum(1);
  at::Tensor tail_sum = (lp * (m - front)).sum(1);
  return front_sum + *ld_alpha * tail_sum;
}

at::Tensor dpo_vocab_mean_logits(const at::Tensor& hidden, const at::Tensor& lm_head) {
  PTK_CHECK(hidden.dim() == 2 && lm_head.dim() == 2 && hidden.size(1) == lm_head.size(1),
            "dpo_vocab_mean_logits: hidden (N, H) and lm_head (V, H) expected, got " + c10::str(hidden.sizes()) +
                " and " + c10::str(lm_head.sizes()));
  torch::NoGradGuard no_grad;
  at::Tensor w_mean = lm_head.to(torch::kFloat32).mean(0);  // (H): mean_v (h · W_v) = h · mean_v W_v
  return hidden.to(torch::kFloat32).matmul(w_mean);         // (N)
}

DpoLossType dpo_loss_type_from_name(const std::string& name) {
  return parse_name("dpo loss_type", name, dpo_table());
}

const char* dpo_loss_type_name(DpoLossType type) {
  for (auto& [n, e] : dpo_table())
    if (e == type) return n.c_str();
  return "?";
}

std::vector<std::string> dpo_validate(const DpoLossOptions& o) {
  std::vector<std::string> errors;
  if (o.loss_type.empty()) errors.push_back("loss_type is empty; name at least one of sigmoid, hinge, ipo, robust, sft, sigmoid_norm");
  for (auto& n : o.loss_type) {
    try {
      dpo_loss_type_from_name(n);
    } catch (const Error& e) {
      errors.push_back(e.what());
    }
  }
  if (!o.loss_weights.empty() && o.loss_weights.size() != o.loss_type.size())
    errors.push_back("loss_weights has " + std::to_string(o.loss_weights.size()) + " entries but loss_type has " +
                     std::to_string(o.loss_type.size()) + "; give one weight per loss type or none");
  if (!(o.beta > 0)) errors.push_back("beta = " + std::to_string(o.beta) + " must be > 0");
  if (!(o.label_smoothing >= 0 && o.label_smoothing < 0.5))
    errors.push_back("label_smoothing = " + std::to_string(o.label_smoothing) + " must be in [0, 0.5)");
  return errors;
}

DpoLossOutput dpo_loss(const DpoPairLogps& p, const DpoLossOptions& o) {
  throw_if(dpo_validate(o), "dpo_loss");
  const char* where = "dpo_loss";
  PTK_CHECK(p.policy_chosen.defined() && p.policy_chosen.dim() == 1, "dpo_loss: policy_chosen must be (P)");
  const int64_t P = p.policy_chosen.size(0);
  check_pairs(p.policy_rejected, "policy_rejected", P, where);
  check_pairs(p.ref_chosen, "ref_chosen", P, where);
  check_pairs(p.ref_rejected, "ref_rejected", P, where);
  check_pairs(p.chosen_tokens, "chosen_tokens", P, where);
  check_pairs(p.rejected_tokens, "rejected_tokens", P, where);
  if (p.policy_chosen_plain.defined()) check_pairs(p.policy_chosen_plain, "policy_chosen_plain", P, where);

  const double beta = o.beta, eps = o.label_smoothing;
  const auto dt = p.policy_chosen.scalar_type();
  at::Tensor rho_c = p.policy_chosen - p.ref_chosen.to(dt).detach();     // (P) ρ⁺
  at::Tensor rho_r = p.policy_rejected - p.ref_rejected.to(dt).detach();  // (P) ρ⁻
  at::Tensor n_c = p.chosen_tokens.to(dt).clamp_min(1), n_r = p.rejected_tokens.to(dt).clamp_min(1);
  at::Tensor delta = rho_c - rho_r;                  // (P) Δ (reverse-KL scores u± = ρ±)
  at::Tensor delta_norm = rho_c / n_c - rho_r / n_r;  // (P) Δ̄

  DpoLossOutput out;
  at::Tensor loss = torch::zeros({}, p.policy_chosen.options());
  for (size_t k = 0; k < o.loss_type.size(); ++k) {
    at::Tensor l;  // (P)
    switch (dpo_loss_type_from_name(o.loss_type[k])) {
      case DpoLossType::kSigmoid: l = neg_logsigmoid(beta * delta); break;
      case DpoLossType::kHinge: l = at::relu(1.0 - beta * delta); break;
      case DpoLossType::kIpo: l = (delta_norm - 1.0 / (2.0 * beta)).pow(2); break;
      case DpoLossType::kRobust:
        l = ((1.0 - eps) * neg_logsigmoid(beta * delta) - eps * neg_logsigmoid(-beta * delta)) / (1.0 - 2.0 * eps);
        break;
      case DpoLossType::kSft: {
        // One token mean over the micro-batch's chosen targets, shared by every pair; never LD-mixed
        // (TRL's sft term averages the per-token log-probs themselves).
        const at::Tensor& chosen = p.policy_chosen_plain.defined() ? p.policy_chosen_plain : p.policy_chosen;
        at::Tensor nll = -chosen.sum() / p.chosen_tokens.to(dt).sum().clamp_min(1);
        l = nll.expand({P});
        break;
      }
      case DpoLossType::kSigmoidNorm: l = neg_logsigmoid(beta * delta_norm); break;
    }
    const double w = o.loss_weights.empty() ? 1.0 : o.loss_weights[k];
    loss = loss + w * l.mean();
    out.per_pair.push_back(l.detach());
  }
  out.loss = loss;
  out.chosen_rewards = (beta * rho_c).detach();
  out.rejected_rewards = (beta * rho_r).detach();
  return out;
}

// ---------------------------------------------------------------------------------------------

CpoLossType cpo_loss_type_from_name(const std::string& name) {
  static const std::vector<std::pair<std::string, CpoLossType>> t = {{"sigmoid", CpoLossType::kSigmoid},
                                                                     {"hinge", CpoLossType::kHinge},
                                                                     {"ipo", CpoLossType::kIpo},
                                                                     {"simpo", CpoLossType::kSimpo}};
  return parse_name("cpo loss_type", name, t);
}

std::vector<std::string> cpo_validate(const CpoLossOptions& o) {
  std::vector<std::string> errors;
  try {
    cpo_loss_type_from_name(o.loss_type);
  } catch (const Error& e) {
    errors.push_back(e.what());
  }
  if (!(o.beta > 0)) errors.push_back("beta = " + std::to_string(o.beta) + " must be > 0");
  if (!(o.cpo_alpha >= 0)) errors.push_back("cpo_alpha = " + std::to_string(o.cpo_alpha) + " must be >= 0");
  if (!(o.label_smoothing >= 0 && o.label_smoothing < 0.5))
    errors.push_back("label_smoothing = " + std::to_string(o.label_smoothing) + " must be in [0, 0.5)");
  return errors;
}

CpoLossOutput cpo_loss(const CpoPairLogps& p, const CpoLossOptions& o) {
  throw_if(cpo_validate(o), "cpo_loss");
  const char* where = "cpo_loss";
  PTK_CHECK(p.policy_chosen.defined() && p.policy_chosen.dim() == 1, "cpo_loss: policy_chosen must be (P)");
  const int64_t P = p.policy_chosen.size(0);
  check_pairs(p.policy_rejected, "policy_rejected", P, where);
  check_pairs(p.chosen_tokens, "chosen_tokens", P, where);
  check_pairs(p.rejected_tokens, "rejected_tokens", P, where);

  const CpoLossType type = cpo_loss_type_from_name(o.loss_type);
  const double beta = o.beta, eps = o.label_smoothing;
  const auto dt = p.policy_chosen.scalar_type();
  const bool mean_scores = type == CpoLossType::kIpo || type == CpoLossType::kSimpo;
  at::Tensor a_c = p.policy_chosen, a_r = p.policy_rejected;  // (P)
  if (mean_scores) {
    a_c = a_c / p.chosen_tokens.to(dt).clamp_min(1);
    a_r = a_r / p.rejected_tokens.to(dt).clamp_min(1);
  }
  at::Tensor d = a_c - a_r;  // (P)
  at::Tensor l;              // (P)
  auto smoothed = [&](const at::Tensor& x) {
    return (1.0 - eps) * neg_logsigmoid(beta * x) + eps * neg_logsigmoid(-beta * x);
  };
  switch (type) {
    case CpoLossType::kSigmoid: l = smoothed(d); break;
    case CpoLossType::kSimpo: l = smoothed(d - o.simpo_gamma / beta); break;
    case CpoLossType::kHinge: l = at::relu(1.0 - beta * d); break;
    case CpoLossType::kIpo: l = (d - 1.0 / (2.0 * beta)).pow(2); break;
  }
  at::Tensor nll = -p.policy_chosen.sum() / p.chosen_tokens.to(dt).sum().clamp_min(1);
  CpoLossOutput out;
  out.loss = l.mean() + o.cpo_alpha * nll;
  out.per_pair = l.detach();
  out.nll = nll.detach();
  out.chosen_scores = a_c.detach();
  out.rejected_scores = a_r.detach();
  out.chosen_rewards = (beta * a_c).detach();
  out.rejected_rewards = (beta * a_r).detach();
  return out;
}

// ---------------------------------------------------------------------------------------------

PairMetricSums pair_metric_sums(const at::Tensor& chosen_rewards, const at::Tensor& rejected_rewards,
                                const at::Tensor& policy_chosen, const at::Tensor& policy_rejected) {
  torch::NoGradGuard no_grad;
  auto d = [](const at::Tensor& t) { return t.detach().to(torch::kFloat64); };
  PairMetricSums s;
  s.pairs = static_cast<double>(chosen_rewards.numel());
  s.reward_chosen = d(chosen_rewards).sum().item<double>();
  s.reward_rejected = d(rejected_rewards).sum().item<double>();
  s.correct = d(chosen_rewards).gt(d(rejected_rewards)).sum().item<double>();
  s.logp_chosen = d(policy_chosen).sum().item<double>();
  s.logp_rejected = d(policy_rejected).sum().item<double>();
  return s;
}

void merge(PairMetricSums& a, const PairMetricSums& b) {
  a.pairs += b.pairs;
  a.reward_chosen += b.reward_chosen;
  a.reward_rejected += b.reward_rejected;
  a.correct += b.correct;
  a.logp_chosen += b.logp_chosen;
  a.logp_rejected += b.logp_rejected;
  a.logits_chosen += b.logits_chosen;
  a.logits_chosen_count += b.logits_chosen_count;
  a.logits_rejected += b.logits_rejected;
  a.logits_rejected_count += b.logits_rejected_count;
}

NamedValues pair_metrics(const PairMetricSums& s) {
  const double nan = std::nan("");
  auto div = [nan](double a, double b) { return b > 0 ? a / b : nan; };
  return {{"rewards/chosen", div(s.reward_chosen, s.pairs)},
          {"rewards/rejected", div(s.reward_rejected, s.pairs)},
          {"rewards/accuracies", div(s.correct, s.pairs)},
          {"rewards/margins", div(s.reward_chosen - s.reward_rejected, s.pairs)},
          {"logps/chosen", div(s.logp_chosen, s.pairs)},
          {"logps/rejected", div(s.logp_rejected, s.pairs)},
          {"logits/chosen", div(s.logits_chosen, s.logits_chosen_count)},
          {"logits/rejected", div(s.logits_rejected, s.logits_rejected_count)}};
}

}  // namespace ptk::rl
