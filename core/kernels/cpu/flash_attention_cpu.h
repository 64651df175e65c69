// Flash-style causal attention kernels for the float32 CPU training path (AVX-512): work goes in
// blocks of query rows; a block's scores against the keys it sees, their softmax and the P·V product
// are done in one worker's buffer (block rows x Lk floats: 192 KB at 48 rows and Lk 1024, in L2)
// before the next block starts, so the (rows x keys) score matrix is never materialised whole, and
// backward recomputes each block's probabilities from the saved row log-sum-exps instead of keeping
// them (what forward saves is O(rows), not O(rows x keys); backward's workspace adds one dK and one
// dV per worker). Rows are blocked, keys are not: past Lk of a few thousand the buffers leave L2.
// The GEMM tiles are ptk's own register-blocked micro-kernel (6 rows x 64 columns of accumulators);
// the attention GEMMs have one dimension of 64 (the head size), where a BLAS call per tile spends
// more on packing and dispatch than on arithmetic.
//
// Internal to causal_attention.cpp, which owns the autograd Function and the layout:
// every tensor is float32 and contiguous; H = batch x K/V heads; the g query heads of a K/V head
// are interleaved by position, row t g + j = query head j at position t, so row r sits at position
// r / g and sees keys [0, r / g + Lk - Lq]. q is already scaled by 1 / sqrt(D).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace ptk::kernels::cpu {

// True where the kernels run: x86 with AVX-512F, float32, head size a multiple of 16.
bool flash_attention_cpu_supported(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

// qs (H, Lq g, D), k/v (H, Lk, D) -> out (H, Lq g, D), lse (H, Lq g): each row's log-sum-exp of its
// scores. block_rows: query rows per work item (rounded up to a multiple of 6).
void flash_attention_forward(const at::Tensor& qs, const at::Tensor& k, const at::Tensor& v, int64_t g,
                             int64_t block_rows, at::Tensor& out, at::Tensor& lse);

// Gradients from the forward's inputs, lse and delta (H, Lq g) = rowsum(dout * out): dqs (the
// gradient of the scaled q), dk, dv, all written whole.
void flash_attention_backward(const at::Tensor& qs, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                              const at::Tensor& lse, const at::Tensor& delta, int64_t g, int64_t block_rows,
                              at::Tensor& dqs, at::Tensor& dk, at::Tensor& dv);

}  // namespace ptk::kernels::cpu
