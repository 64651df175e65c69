#include "sft/sft_loss.h"

#include <torch/torch.h>

#include "core/model/lm_head_logprobs.h"
#include "core/util/error.h"

namespace ptk::sft {

SftTerms sft_terms(const at::Tensor& hidden, const at::Tensor& lm_head, const at::Tensor& labels) {
  PTK_CHECK(hidden.dim() == 3 && labels.dim() == 2 && hidden.size(0) == labels.size(0) &&
                hidden.size(1) == labels.size(1),
            "sft_terms: hidden (B, T, H) and labels (B, T) expected, got " + c10::str(hidden.sizes()) + " and " +
                c10::str(labels.sizes()));
  const int64_t H = hidden.size(2);
  at::Tensor tgt = labels.slice(1, 1).to(hidden.device(), torch::kInt64);  // (B, T-1)
  at::Tensor valid = tgt.ne(-100).reshape({-1});                          // (B*(T-1))
  at::Tensor idx = valid.nonzero().squeeze(1);                            // (M)
  SftTerms out;
  out.targets = idx.size(0);
  if (out.targets == 0) {
    out.nll_sum = (hidden.sum() * 0.0).to(torch::kFloat32);  // keeps the graph; contributes nothing
    return out;
  }
  // Only rows that score a target go through the vocabulary projection.
  at::Tensor h = hidden.slice(1, 0, -1).reshape({-1, H}).index_select(0, idx);  // (M, H)
  at::Tensor t = tgt.reshape({-1}).index_select(0, idx);                        // (M)
  auto lp = model::lm_head_logprobs(h, lm_head, t);
  out.nll_sum = -lp.logprobs.sum();
  out.entropy_sum = lp.entropy.detach().sum().item<double>();
  out.correct = lp.correct.sum().item<int64_t>();
  return out;
}

int64_t count_targets(const at::Tensor& labels) {
  return labels.slice(1, 1).ne(-100).sum().item<int64_t>();
}

}  // namespace ptk::sft
