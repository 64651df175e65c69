// The one fused op for every loss that reads the vocabulary: lm_head projection + log-softmax
// gathered at the targets (plus entropy and argmax hits), over chunks of rows, as a custom autograd
// Function that keeps only the (N) outputs and one log-sum-exp per row, and recomputes each chunk's
// logits in backward. Peak extra memory is about two chunks of (rows x V) logits plus the weight's
// gradient, never (N x V) — unless (N x V) fits LogProbOptions::keep_logits_bytes, where it keeps
// them instead of recomputing.
// Not a loss: SFT/DPO/GRPO reduce its per-token outputs as docs/FORMULAS.md says.
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
  // 256 MiB = 441 rows at vocab 151,936 (was 64 MiB = 110 rows). Measured 2026-11-27, 2 shared
  // cores, OpenBLAS SkylakeX: the op alone at 1023 x 896 x 151,936, forward + backward, chunk sizes
  // alternated in one process (train_step_bench --lm-head-sweep), best of N, seconds:
  //   load 3.1-4.8, N=3: 64 MiB 24.7, 128 MiB 22.4, 256 MiB 19.5, 512 MiB 18.4
  //   load 1.7-1.8, N=2: 64 MiB  8.5, 128 MiB  6.9, 256 MiB  7.7, 512 MiB  7.7
  //   load 1.8-2.0, N=4: 64 MiB  9.6, 128 MiB  7.6, 256 MiB  6.9
  // Small chunks starve the GEMMs and re-read the (V, H) weight gradient once per chunk. Peak RSS
  // raised by lm_head_memory_test (sequence 8192, bound 1.5 GiB; about the gradient + 2 chunks):
  // 128 MiB 809 MiB, 256 MiB 1.04 GiB, 512 MiB ~1.27 GiB (at 2048 rows): too close to the bound.
  int64_t chunk_bytes = 256ll << 20;
  // When all N rows' fp32 logits fit in this many bytes, forward keeps them and backward turns them
  // into the gradient in place instead of recomputing them chunk by chunk, then takes the hidden and
  // weight gradients as one GEMM each over all N rows. Saves the recompute GEMM (a third of the op's
  // FLOPs) and the per-chunk passes over the (V, H) weight gradient. 1 GiB: sequence 1024 of one
  // row at vocab 151,936 is 622 MB; the 8192-token memory test (5 GB of logits) recomputes. 0 = never keep.
  int64_t keep_logits_bytes = 1ll << 30;
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
