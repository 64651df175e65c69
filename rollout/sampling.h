// Token sampling for the rollout engine as a chain of small samplers over a batch of logit rows:
// temperature -> vocabulary limit -> top-k -> top-p -> draw, plus the per-sample random stream.
// Not a scheduler (engine.h) and not text-aware: ids and logits only.
//
// Each row carries its own parameters and its own uniform number, so a row's draw depends only
// on its logits and its (seed, sample, step) stream, never on the other rows of the batch.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace ptk::rollout {

struct SamplingParams {
  // Divides the logits. 0 = greedy (argmax; top_k / top_p are then irrelevant). Higher = flatter.
  double temperature = 1.0;
  // Nucleus: keep the smallest set of most likely tokens whose mass reaches top_p. 1 = off.
  double top_p = 1.0;
  // Keep the k most likely tokens (ties at the k-th value are kept too). 0 = off.
  int64_t top_k = 0;

  bool greedy() const { return temperature <= 0.0; }
};

// Throws ptk::Error naming `where` (e.g. "request 3") for temperature < 0, top_p outside (0, 1],
// top_k < 0.
void validate(const SamplingParams& p, const std::string& where);

// The uniform number in (0, 1) of sample `sample` of a request seeded `seed` at generation step
// `step` (0 = its first token): a counter-based hash (splitmix64), so it depends on nothing else.
double sample_uniform(uint64_t seed, int64_t sample, int64_t step);

// ---- the chain; x is (R, V) float32, modified in place where the name ends in _ ----------------

// x / T per row (T = 1 for greedy rows): (R, V) float32, a new tensor.
at::Tensor apply_temperature(const at::Tensor& logits, const std::vector<SamplingParams>& params);
// Columns >= vocab_limit set to -inf (never drawn). vocab_limit >= V: nothing to do.
void limit_vocab_(at::Tensor& x, int64_t vocab_limit);
// Per row, -inf below the row's k-th largest value (rows with top_k 0 untouched).
void apply_top_k_(at::Tensor& x, const std::vector<SamplingParams>& params);
// Per row, -inf outside the nucleus of softmax(x) (rows with top_p 1 untouched). On CPU (float32,
// contiguous) by one bucketed pass per row, no sort; elsewhere apply_top_p_sorting_.
void apply_top_p_(at::Tensor& x, const std::vector<SamplingParams>& params);
// The same nucleus by tensor ops (any device): the top 256 candidates by at::topk, wider ones or
// the full sort for rows they do not cover. What apply_top_p_ uses off CPU; tests compare the two.
void apply_top_p_sorting_(at::Tensor& x, const std::vector<SamplingParams>& params);
// Per row: argmax for greedy rows, else the inverse CDF of softmax(x) at uniforms[r]. (R) int64.
at::Tensor draw(const at::Tensor& x, const std::vector<SamplingParams>& params, const std::vector<double>& uniforms);

struct Drawn {
  at::Tensor ids;       // (R) int64
  at::Tensor logprobs;  // (R) float32: log_softmax(logits / T) at ids over all V columns (T = 1 when greedy)
};

// The whole chain. logits (R, V) any float dtype. The log-prob is under the full softmax of
// logits / T — over every column of the model, as the trainer's log-probs are — not renormalised
// after the vocabulary limit, top-k or top-p.
Drawn sample_rows(const at::Tensor& logits, const std::vector<SamplingParams>& params,
                  const std::vector<double>& uniforms, int64_t vocab_limit);

}  // namespace ptk::rollout
