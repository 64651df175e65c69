// SFT loss terms as TRL defines them (docs/FORMULAS.md section 1; trl/trainer/sft_trainer.py, chunked
// NLL): the summed next-token NLL over every target of a micro-batch, through the fused lm_head op,
// plus the numerators of mean_token_accuracy and entropy. The caller divides by the optimizer
// step's target count N (the training loop does). Not the data pipeline, not the stage.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <utility>

namespace ptk::sft {

struct SftTerms {
  at::Tensor nll_sum;      // scalar, differentiable: sum over targets of -log p(y_s | ..s-1)
  double entropy_sum = 0;  // sum over targets of the predicting position's entropy (nats)
  int64_t correct = 0;     // targets whose argmax prediction is right
  int64_t targets = 0;     // |V|
};

// hidden (B, T, H): the model's final-norm output; lm_head (V, H); labels (B, T) aligned with the
// input ids (not shifted), -100 where no loss: the target set is {(b, s): s >= 1, labels[b, s] != -100},
// scored from position s - 1 (a label at position 0 is never a target).
SftTerms sft_terms(const at::Tensor& hidden, const at::Tensor& lm_head, const at::Tensor& labels);

// The same terms from targets found on the host: `index` (M) int64 holds the flat positions b·(T-1) + s-1
// of the targets (the predicting positions), `targets` (M) their token ids, both on hidden's device.
// Nothing is read back: the sums stay device tensors (entropy_sum, correct), for the loop to read
// once per step. sft_terms above is this with index = nonzero(shifted labels != -100).
struct SftTermTensors {
  at::Tensor nll_sum;      // scalar, differentiable
  at::Tensor entropy_sum;  // scalar float32, detached
  at::Tensor correct;      // scalar int64
  int64_t targets = 0;     // M
};
SftTermTensors sft_term_tensors(const at::Tensor& hidden, const at::Tensor& lm_head, const at::Tensor& index,
                                const at::Tensor& targets);

// The flat target positions of host-side `labels` (B, T) as sft_term_tensors takes them: {index, targets}.
std::pair<at::Tensor, at::Tensor> target_index(const at::Tensor& labels);

// N for the step, counted on targets (shifted labels): what the loop sums over micro-batches.
int64_t count_targets(const at::Tensor& labels);

}  // namespace ptk::sft
