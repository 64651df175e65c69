// The one fused op for every loss that reads the vocabulary: lm_head projection + log-softmax
// gathered at the targets (plus entropy and argmax hits), over chunks of rows, as a custom autograd
// Function that keeps only the (N) outputs and one log-sum-exp per row, and recomputes each chunk's
// logits in backward. Peak extra memory is one chunk of (rows x V) logits, never (N x V).
// Not a loss: SFT/DPO/GRPO reduce its per-token outputs as FORMULAS.md says.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace ptk::model {

struct TokenLogProbs {
  at::Tensor logprobs;  // (N) float32: log softmax(h W^T / temperature)[target]; differentiable
  at::Tensor entropy;   // (N) float32: entropy of that distribution in nats; differentiable
  at::Tensor correct;   // (N) bool: argmax == target (no gradient)
};

struct LogProbOptions {
  double temperature = 1.0;
  // Rows per chunk; 0 = as many as fit `chunk_bytes` of fp32 logits.
  int64_t chunk_rows = 0;
  int64_t chunk_bytes = 64ll << 20;
  // Vocabulary rows at or past this index get -inf logits (never predicted); 0 = none.
  int64_t valid_vocab = 0;
};

// hidden (N, H) — only the rows that score a target (gather them first: ignored tokens cost
// nothing); weight (V, H), the lm_head (the embedding when tied); targets (N) int64.
// Computed in float32 whatever the inputs' dtype (as TRL's chunked path); gradients flow to hidden
// and weight in their own dtypes.
TokenLogProbs lm_head_logprobs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                               const LogProbOptions& options = {});

}  // namespace ptk::model
