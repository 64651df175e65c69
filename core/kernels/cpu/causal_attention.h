// Causal grouped-query attention for training on the eager (non-SDPA) backend, as one autograd
// Function that skips the masked half: queries go in blocks, and a block of queries ending at
// position e multiplies only keys [0, e) (QK^T, softmax, PV and all four backward GEMMs), where
// the plain path computes every (query, key) pair and masks half of them afterwards. It keeps
// only the blocks' probabilities for backward (about half of the plain path's score matrix).
// Exact: the same softmax over the same visible keys; tests/model/causal_attention_test.cpp checks
// outputs and gradients against the plain path.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace ptk::kernels::cpu {

// q (N, heads, Lq, D), k/v (N, kv_heads, Lk, D), heads a multiple of kv_heads, Lq <= Lk: the
// queries are the last Lq of the Lk positions (query i sees keys j <= Lk - Lq + i). Returns
// (N, heads, Lq, D). float32 only. block_rows = queries per block (the causal saving is
// 1/2 - block_rows / (2 Lq) of the work).
at::Tensor causal_block_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  int64_t block_rows = 128);

// The same attention on ptk's AVX-512 flash kernels (core/kernels/cpu/flash_attention_cpu.h): tiles that
// stay in cache, no probabilities kept for backward (one log-sum-exp per query row instead).
// Same shapes and result; block_rows here counts query rows of one K/V head's group (positions x
// heads / kv_heads), rounded up to a multiple of 6. Needs causal_flash_attention_supported().
bool causal_flash_attention_supported(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
at::Tensor causal_flash_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  int64_t block_rows = 48);

}  // namespace ptk::kernels::cpu
