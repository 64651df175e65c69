#include "sft/sft_loss.h"

#include <torch/torch.h>

#include "core/model/lm_head_logprobs.h"
#include "core/util/error.h"

namespace ptk::sft {

SftTermTensors sft_term_tensors(const at::Tensor& hidden, const at::Tensor& lm_head, const at::Tensor& idx,
                                const at::Tensor& t) {
  PTK_CHECK(hidden.dim() == 3 && idx.dim() == 1 && t.sizes() == idx.sizes(),
            "sft_term_tensors: hidden (B, T, H), index (M) and targets (M) expected, got " + c10::str(hidden.sizes()) +
                ", " + c10::str(idx.sizes()) + " and " + c10::str(t.sizes()));
  const int64_t H = hidden.size(2);
  SftTermTensors out;
  out.targets = idx.size(0);
  if (out.targets == 0) {
    out.nll_sum = (hidden.sum() * 0.0).to(torch::kFloat32);  // keeps the graph; contributes nothing
    out.entropy_sum = torch::zeros({}, hidden.options().dtype(torch::kFloat32));
    out.correct = torch::zeros({}, hidden.options().dtype(torch::kInt64));
    return out;
  }
  // Only rows that score a target go through the vocabulary projection.
  at::Tensor h = hidden.slice(1, 0, -1).reshape({-1, H}).index_select(0, idx);  // (M, H)
  auto lp = model::lm_head_logprobs(h, lm_head, t);
  out.nll_sum = -lp.logprobs.sum();
  out.entropy_sum = lp.entropy.detach().sum();
  out.correct = lp.correct.sum();
  return out;
}

std::pair<at::Tensor, at::Tensor> target_index(const at::Tensor& labels) {
  at::Tensor tgt = labels.slice(1, 1).to(torch::kInt64);   // (B, T-1)
  at::Tensor idx = tgt.ne(-100).reshape({-1}).nonzero().squeeze(1);  // (M)
  return {idx, tgt.reshape({-1}).index_select(0, idx)};
}

SftTerms sft_terms(const at::Tensor& hidden, const at::Tensor& lm_head, const at::Tensor& labels) {
  PTK_CHECK(hidden.dim() == 3 && labels.dim() == 2 && hidden.size(0) == labels.size(0) &&
                hidden.size(1) == labels.size(1),
            "sft_terms: hidden (B, T, H) and labels (B, T) expected, got " + c10::str(hidden.sizes()) + " and " +
                c10::str(labels.sizes()));
  auto [idx, t] = target_index(labels.to(hidden.device()));
  SftTermTensors tt = sft_term_tensors(hidden, lm_head, idx, t);
  SftTerms out;
  out.nll_sum = tt.nll_sum;
  out.targets = tt.targets;
  if (tt.targets > 0) {
    out.entropy_sum = tt.entropy_sum.item<double>();
    out.correct = tt.correct.item<int64_t>();
  }
  return out;
}

int64_t count_targets(const at::Tensor& labels) {
  return labels.slice(1, 1).ne(-100).sum().item<int64_t>();
}

}  // namespace ptk::sft
