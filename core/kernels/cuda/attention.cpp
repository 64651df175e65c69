#include "core/kernels/cuda/attention.h"

#include <ATen/ATen.h>
#include <torch/version.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "core/util/error.h"

namespace ptk::kernels::cuda {

at::Tensor sdpa_causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  // SDPA's fused kernels take 4-D (N, heads, L, D) only; a 3-D call would fall to its math path.
  if (q.dim() == 3) return sdpa_causal_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)).squeeze(0);
  const int64_t lq = q.size(-2), lk = k.size(-2);
  if (lq == lk)
    return at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true, std::nullopt, /*enable_gqa=*/true);
  // SDPA's is_causal aligns the mask top-left; the queries here are the last Lq positions.
  auto mask = at::ones({lq, lk}, q.options().dtype(at::kBool)).tril(lk - lq);
  return at::scaled_dot_product_attention(q, k, v, mask, 0.0, /*is_causal=*/false, std::nullopt, /*enable_gqa=*/true);
}

at::Tensor flash_varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& cu_seqlens, int64_t max_len) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
  PTK_CHECK(q.is_cuda(), "flash_varlen_attention: needs CUDA tensors (kernels::select_attention picks another "
                         "kernel elsewhere)");
  PTK_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && cu_seqlens.dim() == 1,
            "flash_varlen_attention: q (total, heads, D), k/v (total, kv_heads, D), cu_seqlens (docs + 1) expected");
  // (output, logsumexp, rng_state, unused, debug_mask); autograd: FlashAttentionBackward0. Grouped
  // K/V heads are native to the flash kernel (no expansion).
  auto out = at::_flash_attention_forward(q, k, v, cu_seqlens.to(at::kInt), cu_seqlens.to(at::kInt), max_len, max_len,
                                          /*dropout_p=*/0.0, /*is_causal=*/true, /*return_debug_mask=*/false,
                                          1.0 / std::sqrt(static_cast<double>(q.size(-1))));
  return std::get<0>(out);
#else
  (void)q, (void)k, (void)v, (void)cu_seqlens, (void)max_len;
  throw Error("flash_varlen_attention: this LibTorch (" TORCH_VERSION ") has no varlen flash attention; 2.3 or later");
#endif
}

}  // namespace ptk::kernels::cuda
