// GPU attention through ATen's fused kernels (plain ATen calls, no .cu files): SDPA with
// enable_gqa (no K/V expansion copies kept for backward) and, for packed rows, ATen's varlen flash
// attention (cu_seqlens: every document of every row in one call, none attending across another).
// Both have autograd registered in ATen. They also run on the CPU (SDPA's math path) except
// flash_varlen_attention, which needs CUDA and bf16/fp16 (kernels::flash_varlen_serves).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace ptk::kernels::cuda {

// Causal grouped-query attention: q (N, heads, Lq, D) or (heads, Lq, D), k/v (.., kv_heads, Lk, D),
// Lq <= Lk, the queries the last Lq of the Lk positions. Same result as ref::causal_attention.
at::Tensor sdpa_causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

// Packed documents: q (total, heads, D), k/v (total, kv_heads, D) with the documents laid end to
// end; cu_seqlens (docs + 1) int32 on q's device, the documents' offsets; max_len their longest.
// Each document attends causally to itself only. Returns (total, heads, D).
at::Tensor flash_varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& cu_seqlens, int64_t max_len);

}  // namespace ptk::kernels::cuda
