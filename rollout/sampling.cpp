// The sampler chain (temperature -> vocabulary limit -> top-k -> top-p -> draw) on (R, V) logits.
// Not the engine's scheduling: see engine.cpp.
#include "rollout/sampling.h"

#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "core/util/error.h"

namespace ptk::rollout {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

bool any_top_k(const std::vector<SamplingParams>& p) {
  for (const auto& s : p)
    if (!s.greedy() && s.top_k > 0) return true;
  return false;
}

bool any_top_p(const std::vector<SamplingParams>& p) {
  for (const auto& s : p)
    if (!s.greedy() && s.top_p < 1.0) return true;
  return false;
}

}  // namespace

void validate(const SamplingParams& p, const std::string& where) {
  if (!(p.temperature >= 0.0) || !std::isfinite(p.temperature))
    throw Error(where + ": temperature " + std::to_string(p.temperature) + " must be >= 0 (0 = greedy)");
  if (!(p.top_p > 0.0 && p.top_p <= 1.0))
    throw Error(where + ": top_p " + std::to_string(p.top_p) + " must be in (0, 1] (1 = off)");
  if (p.top_k < 0) throw Error(where + ": top_k " + std::to_string(p.top_k) + " must be >= 0 (0 = off)");
}

double sample_uniform(uint64_t seed, int64_t sample, int64_t step) {
  uint64_t h = splitmix64(seed);
  h = splitmix64(h ^ static_cast<uint64_t>(sample));
  h = splitmix64(h ^ (static_cast<uint64_t>(step) * 0xD1B54A32D192ED03ull));
  // 53 random bits, centred in their bucket: strictly inside (0, 1).
  return (static_cast<double>(h >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

at::Tensor apply_temperature(const at::Tensor& logits, const std::vector<SamplingParams>& params) {
  const int64_t R = logits.size(0);
  std::vector<float> inv(R);
  bool all_one = true;
  for (int64_t r = 0; r < R; ++r) {
    inv[r] = params[r].greedy() ? 1.0f : static_cast<float>(1.0 / params[r].temperature);
    all_one = all_one && inv[r] == 1.0f;
  }
  auto x = logits.to(at::kFloat);
  if (all_one) return x.is_same(logits) ? x.clone() : x;
  return x * at::tensor(inv, at::kFloat).to(x.device()).unsqueeze(1);  // (R, V)
}

void limit_vocab_(at::Tensor& x, int64_t vocab_limit) {
  const int64_t V = x.size(1);
  if (vocab_limit > 0 && vocab_limit < V) x.narrow(1, vocab_limit, V - vocab_limit).fill_(kNegInf);
}

void apply_top_k_(at::Tensor& x, const std::vector<SamplingParams>& params) {
  if (!any_top_k(params)) return;
  const int64_t R = x.size(0), V = x.size(1);
  int64_t kmax = 1;
  for (const auto& p : params)
    if (!p.greedy() && p.top_k > 0) kmax = std::max(kmax, std::min(p.top_k, V));
  auto top = std::get<0>(at::topk(x, kmax, 1, /*largest=*/true, /*sorted=*/true));  // (R, kmax)
  std::vector<int64_t> kth(R, 0);
  std::vector<uint8_t> on(R, 0);
  for (int64_t r = 0; r < R; ++r) {
    const auto& p = params[r];
    if (!p.greedy() && p.top_k > 0 && p.top_k < V) {
      kth[r] = p.top_k - 1;
      on[r] = 1;
    }
  }
  auto dev = x.device();
  auto thr = top.gather(1, at::tensor(kth, at::kLong).to(dev).unsqueeze(1));  // (R, 1)
  auto use = at::tensor(on, at::kByte).to(dev, at::kBool).unsqueeze(1);                  // (R, 1)
  thr = at::where(use, thr, at::full_like(thr, kNegInf));
  x.masked_fill_(x < thr, kNegInf);
}

void apply_top_p_(at::Tensor& x, const std::vector<SamplingParams>& params) {
  if (!any_top_p(params)) return;
  const int64_t R = x.size(0);
  std::vector<float> p(R);
  for (int64_t r = 0; r < R; ++r) p[r] = (!params[r].greedy() && params[r].top_p < 1.0) ? params[r].top_p : 2.0f;
  auto sorted = std::get<0>(x.sort(1, /*descending=*/true));  // (R, V)
  auto probs = at::softmax(sorted, 1);
  auto before = probs.cumsum(1) - probs;  // mass strictly before each token
  // Keep a token while the mass before it is below top_p (the first token is always kept).
  auto keep = before < at::tensor(p, at::kFloat).to(x.device()).unsqueeze(1);  // (R, V)
  auto n_keep = keep.sum(1, /*keepdim=*/true).clamp_min(1);                     // (R, 1)
  auto thr = sorted.gather(1, n_keep - 1);                                        // (R, 1)
  x.masked_fill_(x < thr, kNegInf);
}

at::Tensor draw(const at::Tensor& x, const std::vector<SamplingParams>& params, const std::vector<double>& uniforms) {
  const int64_t R = x.size(0);
  bool all_greedy = true, any_greedy = false;
  for (const auto& p : params) {
    all_greedy = all_greedy && p.greedy();
    any_greedy = any_greedy || p.greedy();
  }
  auto argmax = any_greedy ? x.argmax(1) : at::Tensor();  // (R)
  if (all_greedy) return argmax;
  // Inverse CDF: the first column whose cumulative (unnormalised) mass reaches u * total.
  auto w = (x - std::get<0>(x.max(1, /*keepdim=*/true))).exp();  // (R, V), 0 where -inf
  auto cdf = w.cumsum(1);
  std::vector<float> u(uniforms.begin(), uniforms.end());
  auto target = at::tensor(u, at::kFloat).to(x.device()).unsqueeze(1) * cdf.narrow(1, cdf.size(1) - 1, 1);  // (R, 1)
  auto picked = at::searchsorted(cdf, target).squeeze(1).clamp_max(x.size(1) - 1);  // (R)
  if (!any_greedy) return picked;
  std::vector<uint8_t> g(R);
  for (int64_t r = 0; r < R; ++r) g[r] = params[r].greedy();
  return at::where(at::tensor(g, at::kByte).to(x.device(), at::kBool), argmax, picked);
}

Drawn sample_rows(const at::Tensor& logits, const std::vector<SamplingParams>& params,
                  const std::vector<double>& uniforms, int64_t vocab_limit) {
  PTK_CHECK(logits.dim() == 2 && static_cast<int64_t>(params.size()) == logits.size(0) &&
                uniforms.size() == params.size(),
            "sample_rows: logits (R, V) with one SamplingParams and one uniform per row");
  at::NoGradGuard no_grad;
  auto x = apply_temperature(logits, params);  // (R, V) float32, our own copy
  auto lse = at::logsumexp(x, 1);              // (R): normaliser of the full softmax, before any filter
  limit_vocab_(x, vocab_limit);
  apply_top_k_(x, params);
  apply_top_p_(x, params);
  Drawn d;
  d.ids = draw(x, params, uniforms);
  // The chosen column is never filtered out, so x still holds its scaled logit.
  d.logprobs = x.gather(1, d.ids.unsqueeze(1)).squeeze(1) - lse;
  return d;
}

}  // namespace ptk::rollout
